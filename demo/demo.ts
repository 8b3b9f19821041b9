#!/usr/bin/env node
/**
 * `make demo`: the whole cascade on one machine, no VM needed (README.md).
 *
 * A host broker and two guest agents run as separate processes over unix sockets. Each
 * "VM" is a cgroup (`<root>/vm1`, `<root>/vm2`) whose limits play the VM's allocation;
 * each guest agent runs three demo projects beneath it. The demo reclaims memory and CPU
 * from vm1 with the real `nestctl`, shows the notice going host → guest → projects, the
 * shrinks and graceful stops, the VM cgroup's limits lowered only after the outcome, and
 * no OOM kill anywhere; then restores and shows the projects coming back.
 *
 * Every figure in the final JSON line is read from the kernel's files. Options:
 *   --root NAME   cgroup root (default nestbroker-demo; tests pass nestbroker-test-<pid>)
 */
import { spawn } from 'node:child_process';
import { promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { rpcCall } from '../agent/common/rpc';
import type { NoticeView } from '../agent/host/api';
import { NESTCTL, Stack, removeLeftoverRoot, waitFor, type GuestSpec } from './stack';

const MiB = 1024 * 1024;
const argRoot = (): string => {
  const i = process.argv.indexOf('--root');
  return i >= 0 ? process.argv[i + 1] : 'nestbroker-demo';
};
const ROOT = argRoot();
const V1 = '/sys/fs/cgroup';

const say = (s = ''): void => console.log(s);
const step = (s: string): void => console.log(`\n=== ${s}`);

const proj = (name: string, priority: number) => ({
  name,
  priority,
  memoryMin: '128MiB',
  memoryMax: '256MiB',
  cpuMin: 0.2,
  cpuMax: 0.6,
  holdMiB: 32,
  burn: 0.05,
  gracePeriod: '5s',
});

const GUESTS: GuestSpec[] = [
  {
    name: 'vm1',
    priority: 10,
    memory: '1GiB',
    cpus: 2,
    floor: { memory: '256MiB', cpus: 0.5 },
    projects: [proj('web', 100), proj('api', 50), proj('batch', 10)],
  },
  {
    name: 'vm2',
    priority: 20,
    memory: '1GiB',
    cpus: 2,
    floor: { memory: '256MiB', cpus: 0.5 },
    projects: [proj('db', 100), proj('cache', 50), proj('report', 10)],
  },
];

/** A v1 memory file of a group beneath the root, or null when the group is gone. */
function memFile(group: string, file: string): string | null {
  try {
    return readFileSync(path.join(V1, 'memory', ROOT, group, file), 'utf8').trim();
  } catch {
    return null;
  }
}
function limitOf(group: string): number | null {
  const v = memFile(group, 'memory.limit_in_bytes');
  return v === null ? null : Number(v);
}
function cpuQuotaOf(group: string): string | null {
  try {
    const q = readFileSync(path.join(V1, 'cpu', ROOT, group, 'cpu.cfs_quota_us'), 'utf8').trim();
    const p = readFileSync(path.join(V1, 'cpu', ROOT, group, 'cpu.cfs_period_us'), 'utf8').trim();
    return `${q} ${p}`;
  } catch {
    return null;
  }
}
function oomKillsOf(group: string): number {
  const v = memFile(group, 'memory.oom_control');
  const m = v ? /oom_kill (\d+)/.exec(v) : null;
  return m ? Number(m[1]) : 0;
}
function procsOf(group: string): number[] | null {
  try {
    return readFileSync(path.join(V1, 'unified', ROOT, group, 'cgroup.procs'), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map(Number);
  } catch {
    return null;
  }
}

function nestctl(args: string[], prefix = '  | '): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [NESTCTL, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    const show = (b: Buffer): void => {
      out += b.toString();
      for (const l of b.toString().split('\n')) if (l) process.stdout.write(`${prefix}${l}\n`);
    };
    child.stdout.on('data', show);
    child.stderr.on('data', show);
    child.on('exit', (code) => resolve({ code, out }));
  });
}

async function main(): Promise<number> {
  if (process.getuid?.() !== 0) {
    console.error('make demo must run as root: it creates cgroups');
    return 1;
  }
  say(`nestbroker demo: a host broker, two guest agents and six projects, cgroup root "${ROOT}"`);
  step('clean up after any earlier demo that was interrupted');
  say(
    (await removeLeftoverRoot(ROOT))
      ? `  removed a leftover ${ROOT} (its processes killed through the cgroup)`
      : '  nothing left over',
  );

  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nestbroker-demo-'));
  const stack = new Stack({ root: ROOT, dir, guests: GUESTS, transport: 'unix' });
  const oomSeen = new Map<string, number>();
  let sampler: NodeJS.Timeout | null = null;
  const groups = (): string[] => {
    const out: string[] = [];
    for (const g of GUESTS) {
      out.push(g.name);
      for (const p of g.projects) out.push(`${g.name}/projects/${p.name}`);
    }
    return out;
  };
  const sampleOom = (): void => {
    for (const grp of groups()) oomSeen.set(grp, Math.max(oomSeen.get(grp) ?? 0, oomKillsOf(grp)));
  };
  const onSignal = (): void => {
    void stack.teardown().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    step('create the "VMs": one cgroup each, its limits playing the VM allocation');
    await stack.createVms();
    await stack.writeConfigs();
    for (const g of GUESTS)
      say(
        `  ${ROOT}/${g.name}: memory.limit_in_bytes ${limitOf(g.name)}, cpu quota/period ${cpuQuotaOf(g.name)}`,
      );

    step('start two guest agents and the host broker (separate processes, unix sockets)');
    for (const g of GUESTS) {
      const r = await stack.startGuest(g.name);
      say(`  guest ${g.name}: pid ${r.proc?.child.pid}, channel ${r.channel}`);
    }
    const host = await stack.startHost();
    say(`  host broker: pid ${host.child.pid}, operator socket ${stack.hostSocket}`);
    await stack.waitConnected();
    await waitFor('every project running', async () => {
      for (const g of GUESTS)
        for (const p of g.projects) {
          const procs = procsOf(`${g.name}/projects/${p.name}`);
          if (!procs || procs.length === 0) return false;
        }
      return true;
    });
    sampler = setInterval(sampleOom, 200);
    sampleOom();
    await nestctl(['--socket', stack.hostSocket, 'guests']);

    const before = new Map<string, number | null>();
    for (const grp of groups()) before.set(grp, limitOf(grp));
    const vmBefore = { memory: limitOf('vm1'), cpu: cpuQuotaOf('vm1') };

    step('plan: what a reclaim of 768MiB and 1 CPU would leave vm1');
    await nestctl([
      '--socket',
      stack.hostSocket,
      'plan',
      'vm1',
      '--memory',
      '768MiB',
      '--cpus',
      '1',
    ]);

    step('reclaim 768MiB and 1 CPU from vm1 through nestctl (host → guest → projects)');
    // Watch the VM's limit file: when did the kernel see it change?
    let vmLoweredAt: number | null = null;
    const watch = setInterval(() => {
      if (vmLoweredAt === null && limitOf('vm1') !== vmBefore.memory) vmLoweredAt = Date.now();
    }, 5);
    const rec = await nestctl([
      '--socket',
      stack.hostSocket,
      'reclaim',
      'vm1',
      '--memory',
      '768MiB',
      '--cpus',
      '1',
      '--deadline',
      '30s',
      '--reason',
      'make demo: host maintenance',
    ]);
    clearInterval(watch);
    sampleOom();
    const notices = (await rpcCall(stack.hostSocket, 'notices', { guest: 'vm1' })) as NoticeView[];
    const notice = notices[notices.length - 1];
    const after = new Map<string, number | null>();
    for (const grp of groups()) after.set(grp, limitOf(grp));
    const vmAfter = { memory: limitOf('vm1'), cpu: cpuQuotaOf('vm1') };

    step('what the kernel shows now');
    say(`  ${ROOT}/vm1 memory.limit_in_bytes: ${vmBefore.memory} → ${vmAfter.memory}`);
    say(`  ${ROOT}/vm1 cpu quota/period:      ${vmBefore.cpu} → ${vmAfter.cpu}`);
    const outcomeAt = notice?.outcomeAt ? Date.parse(notice.outcomeAt) : NaN;
    const guestDoneAt = notice?.outcome ? Date.parse(notice.outcome.finishedAt) : NaN;
    say(`  guest finished its cascade at ${notice?.outcome?.finishedAt}`);
    say(`  host journaled the outcome at ${notice?.outcomeAt}`);
    say(
      `  the kernel's VM limit changed at ${vmLoweredAt ? new Date(vmLoweredAt).toISOString() : 'never'}`,
    );
    const vmLimitsLoweredAfterOutcome =
      vmLoweredAt !== null &&
      vmAfter.memory !== null &&
      vmBefore.memory !== null &&
      vmAfter.memory < vmBefore.memory &&
      vmLoweredAt >= guestDoneAt &&
      vmLoweredAt >= outcomeAt - 5; // the poller's 5 ms granularity
    const stops = (notice?.outcome?.projects ?? []).filter((p) => p.action === 'stopped');
    say(`  stopped, in order: ${stops.map((p) => `${p.name} (${p.exit})`).join(', ') || 'none'}`);
    for (const p of stops) {
      const saved = await fs.readFile(stack.markerOf('vm1', p.name), 'utf8').catch(() => null);
      say(`  ${p.name} saved its work on SIGTERM: ${saved ? saved.trim() : 'NO MARKER FILE'}`);
    }

    const projects = [];
    for (const g of GUESTS)
      for (const p of g.projects) {
        const grp = `${g.name}/projects/${p.name}`;
        const o =
          g.name === 'vm1' ? notice?.outcome?.projects.find((x) => x.name === p.name) : undefined;
        const b = before.get(grp) ?? null;
        const a = after.get(grp) ?? null;
        const procs = procsOf(grp);
        // The action as the kernel shows it: no process left = stopped; a lower limit = shrunk.
        const action =
          procs === null || procs.length === 0
            ? 'stopped'
            : a !== null && b !== null && a < b
              ? 'shrunk'
              : 'unchanged';
        let exit: string | null = null;
        if (action === 'stopped') {
          const saved = await fs.stat(stack.markerOf(g.name, p.name)).then(
            () => true,
            () => false,
          );
          exit = o?.exit === 'graceful' && saved ? 'graceful' : (o?.exit ?? 'killed');
        }
        projects.push({
          guest: g.name,
          name: p.name,
          priority: p.priority,
          action,
          exit,
          memoryMaxBefore: b,
          memoryMaxAfter: a,
        });
      }
    say();
    say(
      projects
        .map(
          (p) =>
            `  ${p.guest}/${p.name.padEnd(7)} prio ${String(p.priority).padStart(3)}  ${p.action.padEnd(9)} ${String(p.exit ?? '-').padEnd(9)} ` +
            `limit ${p.memoryMaxBefore === null ? '-' : `${p.memoryMaxBefore / MiB}MiB`} → ${p.memoryMaxAfter === null ? '-' : `${p.memoryMaxAfter / MiB}MiB`}`,
        )
        .join('\n'),
    );

    step('restore vm1: the host raises the VM limits first, then tells the guest');
    await nestctl(['--socket', stack.hostSocket, 'restore', 'vm1', '--deadline', '30s']);
    await waitFor(
      'stopped projects running again',
      async () => stops.every((p) => (procsOf(`vm1/projects/${p.name}`) ?? []).length > 0),
      20_000,
    ).then(
      () =>
        say(
          `  back: ${stops.map((p) => `${p.name} (pids ${procsOf(`vm1/projects/${p.name}`)?.join(',')})`).join(', ')}`,
        ),
      (err: unknown) => say(`  not all back: ${String(err)}`),
    );
    say(
      `  ${ROOT}/vm1 memory.limit_in_bytes now ${limitOf('vm1')}, cpu quota/period ${cpuQuotaOf('vm1')}`,
    );
    await nestctl(['--socket', stack.hostSocket, 'notices', 'vm1']);
    sampleOom();

    const oomKills = [...oomSeen.values()].reduce((s, n) => s + n, 0);
    step('no OOM kill anywhere');
    say(`  memory.oom_control oom_kill over ${oomSeen.size} cgroups: ${oomKills}`);
    const ok =
      rec.code === 0 &&
      oomKills === 0 &&
      vmLimitsLoweredAfterOutcome &&
      projects.some((p) => p.action === 'stopped') &&
      projects.every((p) => p.action !== 'stopped' || p.exit === 'graceful');
    step('cleaning up');
    if (sampler) clearInterval(sampler);
    await stack.teardown();
    await fs.rm(dir, { recursive: true, force: true });
    say(`  processes stopped by pid, ${ROOT} removed`);
    console.log(JSON.stringify({ ok, oomKills, projects, vmLimitsLoweredAfterOutcome }));
    return ok ? 0 : 1;
  } catch (err) {
    if (sampler) clearInterval(sampler);
    console.error(`demo failed: ${err instanceof Error ? err.stack : String(err)}`);
    console.error(`logs kept in ${dir}/logs`);
    await stack.teardown().catch(() => undefined);
    console.log(JSON.stringify({ ok: false, error: String(err) }));
    return 1;
  }
}

main().then((code) => process.exit(code));
