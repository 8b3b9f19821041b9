#!/usr/bin/env node
/**
 * Graceful vs OOM, side by side (docs/performance.md, part 3), on this machine.
 *
 * The same workload each run: a "VM" cgroup (`<root>/vm1`, v1 memory.limit_in_bytes
 * 288 MiB, hybrid here) holding three projects of different priorities (web 100, api 50,
 * batch 10), each a real process (dist/demo/project.js) holding 64 MiB and saving its work
 * to a marker file on SIGTERM, and an idle balloon process (bench/lib/balloon.ts). The VM
 * then loses 96 MiB, handled by:
 *
 *   (a) nothing: the balloon inflates by 96 MiB inside the VM (what a balloon does to a
 *       guest; a v1 limit write below usage fails with EBUSY rather than OOM-killing), and
 *       the kernel's OOM killer picks whom to kill.
 *   (b) nestbroker: a real host broker and guest agent (the guest agent runs the three
 *       projects): `reclaim 96MiB` on the host's operator socket → notice → the guest
 *       stops the lowest-priority project gracefully → outcome → the host lowers the VM
 *       cgroup's limit by 96 MiB.
 *
 * Counted per run: OOM kills (memory.oom_control oom_kill of the VM and its groups), who
 * died by SIGKILL, graceful ends, whether the lowest-priority project was the one stopped,
 * work lost (markers not written by projects that ended), and the time until the memory was
 * actually free (a: the balloon holds its 96 MiB; b: the VM limit is lowered, with the
 * usage below it).
 *
 *   make build && node dist/bench/graceful-vs-oom.js [--runs 5]
 *
 * `--real-guest` runs the same comparison inside a QEMU guest (the real-guest test's image,
 * test/e2e) whose balloon inflates, with (a) nothing, (b) nestbroker, (c) earlyoom and
 * (d) systemd-oomd from Debian's packages with their defaults: bench/lib/real-guest.ts,
 * bench/results/graceful-vs-oom-real-guest.json.
 *
 *   make build && node dist/bench/graceful-vs-oom.js --real-guest [--runs 3]
 */
import { type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openCgroupAdapter, spawnInto, type CgroupDriver } from '../cgroup-adapter/index';
import { rpcCall } from '../agent/common/rpc';
import type { NoticeView } from '../agent/host/api';
import { PROJECT, Stack, removeLeftoverRoot, waitFor, type GuestSpec } from '../demo/stack';
import { VARIANTS, type Variant } from '../test/e2e/scenario';
import {
  intArg,
  nowMs,
  numArg,
  parseArgs,
  r1,
  requireRoot,
  say,
  table,
  writeResult,
} from './lib/common';
import { runRealGuest } from './lib/real-guest';
import { nestbrokerGoal, tallyVariants, totalsTable } from './lib/squeeze-tally';

const OPTIONS = {
  runs: 'runs of each variant (default 5)',
  root: 'cgroup root (default nestbroker-bench-<pid>)',
  out: 'JSON file (default bench/results/graceful-vs-oom.json)',
  'real-guest':
    'inside a QEMU guest: nothing, nestbroker, earlyoom, systemd-oomd (default runs 3; JSON graceful-vs-oom-real-guest.json)',
  variants:
    'with --real-guest: which, comma-separated (default nothing,nestbroker,earlyoom,systemd-oomd)',
  'squeeze-seconds':
    'with --real-guest: how long a squeeze is watched before "never freed" (default 180)',
};

const MiB = 2 ** 20;
export const VM_MEMORY_MIB = 288;
export const SHRINK_MIB = 96;
export const HOLD_MIB = 64;
export const PROJECTS = [
  { name: 'web', priority: 100 },
  { name: 'api', priority: 50 },
  { name: 'batch', priority: 10 },
] as const;
const LOWEST = 'batch';
const BALLOON = path.join(__dirname, 'lib', 'balloon.js');

export interface RunResult {
  variant: 'nothing' | 'nestbroker';
  run: number;
  oomKills: number;
  /** projects that ended, and how */
  ended: {
    name: string;
    priority: number;
    how: 'graceful' | 'SIGKILL' | string;
    marker: boolean;
  }[];
  gracefulEnds: number;
  killedBySigkill: number;
  lowestPriorityWasTheOneStopped: boolean;
  /** projects that ended without saving their work */
  workLost: number;
  /** how the balloon was kept from being the OOM killer's victim */
  shield?: string;
  /** ms until the memory was actually free */
  msUntilFree: number | null;
  vmUsageBeforeBytes: number;
  vmUsageAfterBytes: number;
  vmLimitAfterBytes: number | null;
  note?: string;
}

async function exists(f: string): Promise<boolean> {
  return fs.stat(f).then(
    () => true,
    () => false,
  );
}

/**
 * The balloon must not be the OOM killer's victim (a real balloon's pages are the guest
 * kernel's). It asks for oom_score_adj -1000 itself, which needs CAP_SYS_RESOURCE; where
 * that is missing (containers, this build machine), every project gets the same +500
 * instead: the same for all of them, so the kernel's choice between them is its own.
 */
async function shieldBalloon(
  driver: CgroupDriver,
  balloonPid: number,
  vm: string,
): Promise<string> {
  const adj = (await fs.readFile(`/proc/${balloonPid}/oom_score_adj`, 'utf8')).trim();
  if (adj === '-1000') return 'balloon oom_score_adj -1000';
  for (const p of PROJECTS)
    for (const pid of await driver.pids(`${vm}/projects/${p.name}`))
      await fs.writeFile(`/proc/${pid}/oom_score_adj`, '500');
  return 'no CAP_SYS_RESOURCE: every project oom_score_adj +500, the balloon 0';
}

async function oomKills(driver: CgroupDriver, groups: string[]): Promise<number> {
  let n = 0;
  for (const g of groups) {
    const u = await driver.usage(g).catch(() => null);
    n += u?.memoryEvents.oomKill ?? 0;
  }
  return n;
}

function limitOf(root: string, group: string): Promise<number | null> {
  return fs
    .readFile(path.join('/sys/fs/cgroup/memory', root, group, 'memory.limit_in_bytes'), 'utf8')
    .then(
      (t) => Number(t.trim()),
      () => null,
    );
}

/** The balloon, idle, in `<vm>/balloon`; inflate() resolves with the ms it took. */
async function startBalloon(driver: CgroupDriver, vm: string) {
  await driver.create(`${vm}/balloon`);
  const child = await spawnInto(driver, `${vm}/balloon`, process.execPath, [BALLOON], {
    stdio: ['pipe', 'pipe', 'ignore'],
  });
  let out = '';
  const waitLine = (re: RegExp, timeoutMs: number): Promise<RegExpExecArray | null> =>
    new Promise((resolve) => {
      const t = setTimeout(() => done(null), timeoutMs);
      const check = (): void => {
        const m = re.exec(out);
        if (m) done(m);
      };
      const done = (m: RegExpExecArray | null): void => {
        clearTimeout(t);
        child.stdout!.off('data', onData);
        resolve(m);
      };
      const onData = (b: Buffer): void => {
        out += b.toString();
        check();
      };
      child.stdout!.on('data', onData);
      check();
    });
  if (!(await waitLine(/ready/, 10_000))) throw new Error('the balloon did not start');
  return {
    child,
    inflate: async (mib: number, timeoutMs: number): Promise<number | null> => {
      child.stdin!.write(`inflate ${mib}\n`);
      const m = await waitLine(/inflated \d+ (\d+)/, timeoutMs);
      return m ? Number(m[1]) : null;
    },
  };
}

// ---------------------------------------------------------------- (a) nothing

async function runNothing(base: string, run: number): Promise<RunResult> {
  const root = `${base}/a${run}`;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nestbroker-bench-oom-a-'));
  const driver = await openCgroupAdapter({ root, create: true });
  const children: {
    name: string;
    priority: number;
    child: ChildProcess;
    exit: Promise<NodeJS.Signals | number | null>;
  }[] = [];
  let balloon: Awaited<ReturnType<typeof startBalloon>> | undefined;
  try {
    await driver.create('vm1', { memory: { max: VM_MEMORY_MIB * MiB } });
    for (const p of PROJECTS) {
      const group = `vm1/projects/${p.name}`;
      await driver.create(group);
      const marker = path.join(dir, `${p.name}.saved`);
      const child = await spawnInto(
        driver,
        group,
        process.execPath,
        [PROJECT, '--name', p.name, '--memory', String(HOLD_MIB), '--cpu', '0', '--marker', marker],
        { stdio: 'ignore' },
      );
      const exit = new Promise<NodeJS.Signals | number | null>((resolve) =>
        child.once('exit', (code, signal) => resolve(signal ?? code)),
      );
      children.push({ ...p, child, exit });
    }
    balloon = await startBalloon(driver, 'vm1');
    await waitFor('the projects holding their memory', async () => {
      const u = await driver.usage('vm1');
      return u.memoryCurrent >= 3 * HOLD_MIB * MiB;
    });
    await new Promise((r) => setTimeout(r, 500));
    const shield = await shieldBalloon(driver, balloon.child.pid!, 'vm1');
    const groups = ['vm1', 'vm1/balloon', ...PROJECTS.map((p) => `vm1/projects/${p.name}`)];
    const oomBefore = await oomKills(driver, groups);
    const before = (await driver.usage('vm1')).memoryCurrent;
    const t0 = nowMs();
    const inflated = await balloon.inflate(SHRINK_MIB, 30_000);
    const msUntilFree = inflated === null ? null : nowMs() - t0;
    await new Promise((r) => setTimeout(r, 300)); // let exits be reaped
    const ended: RunResult['ended'] = [];
    for (const c of children) {
      if (c.child.exitCode === null && c.child.signalCode === null) continue;
      const how = await c.exit;
      ended.push({
        name: c.name,
        priority: c.priority,
        how: how === 'SIGKILL' ? 'SIGKILL' : how === 0 ? 'graceful' : String(how),
        marker: await exists(path.join(dir, `${c.name}.saved`)),
      });
    }
    const oom = (await oomKills(driver, groups)) - oomBefore;
    const usage = await driver.usage('vm1');
    return {
      variant: 'nothing',
      run,
      oomKills: oom,
      ended,
      gracefulEnds: ended.filter((e) => e.how === 'graceful').length,
      killedBySigkill: ended.filter((e) => e.how === 'SIGKILL').length,
      lowestPriorityWasTheOneStopped: ended.length === 1 && ended[0].name === LOWEST,
      workLost: ended.filter((e) => !e.marker).length,
      msUntilFree: msUntilFree === null ? null : r1(msUntilFree),
      shield,
      vmUsageBeforeBytes: before,
      vmUsageAfterBytes: usage.memoryCurrent,
      vmLimitAfterBytes: await limitOf(root, 'vm1'),
      note: inflated === null ? 'the balloon did not get its memory within 30 s' : undefined,
    };
  } finally {
    balloon?.child.kill('SIGKILL');
    for (const c of children) c.child.kill('SIGKILL');
    await driver.removeRoot(10_000).catch(() => undefined);
    await fs.rm(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- (b) nestbroker

async function runNestbroker(base: string, run: number): Promise<RunResult> {
  const root = `${base}/b${run}`;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nestbroker-bench-oom-b-'));
  const guest: GuestSpec = {
    name: 'vm1',
    priority: 10,
    memory: `${VM_MEMORY_MIB}MiB`,
    cpus: 2,
    floor: { memory: '64MiB', cpus: 0.5 },
    projects: PROJECTS.map((p) => ({
      name: p.name,
      priority: p.priority,
      memoryMin: '80MiB',
      memoryMax: '96MiB',
      cpuMin: 0.1,
      cpuMax: 0.5,
      holdMiB: HOLD_MIB,
      burn: 0,
      gracePeriod: '10s',
    })),
  };
  const stack = new Stack({ root, dir, guests: [guest], transport: 'unix' });
  let balloon: Awaited<ReturnType<typeof startBalloon>> | undefined;
  try {
    await stack.createVms();
    await stack.writeConfigs();
    await stack.startGuest('vm1');
    await stack.startHost();
    await stack.waitConnected();
    const driver = stack.driver;
    balloon = await startBalloon(driver, 'vm1');
    await waitFor('the projects holding their memory', async () => {
      const u = await driver.usage('vm1');
      return u.memoryCurrent >= 3 * HOLD_MIB * MiB;
    });
    await new Promise((r) => setTimeout(r, 500));
    const shield = await shieldBalloon(driver, balloon.child.pid!, 'vm1');
    const groups = ['vm1', 'vm1/balloon', ...PROJECTS.map((p) => `vm1/projects/${p.name}`)];
    const oomBefore = await oomKills(driver, groups);
    const before = (await driver.usage('vm1')).memoryCurrent;
    const t0 = nowMs();
    const v = (await rpcCall(
      stack.hostSocket,
      'reclaim',
      {
        guest: 'vm1',
        memory: `${SHRINK_MIB}MiB`,
        deadline: '30s',
        reason: 'bench graceful-vs-oom',
      },
      { timeoutMs: 60_000 },
    )) as NoticeView;
    const ms = nowMs() - t0;
    const limit = await limitOf(root, 'vm1');
    const usage = await driver.usage('vm1');
    const freed =
      v.state === 'done' &&
      limit !== null &&
      limit <= (VM_MEMORY_MIB - SHRINK_MIB) * MiB &&
      usage.memoryCurrent <= limit;
    const ended: RunResult['ended'] = [];
    for (const p of v.outcome?.projects ?? []) {
      if (p.action !== 'stopped') continue;
      const cfg = PROJECTS.find((x) => x.name === p.name)!;
      ended.push({
        name: p.name,
        priority: cfg.priority,
        how: p.exit === 'graceful' ? 'graceful' : p.exit === 'killed' ? 'SIGKILL' : String(p.exit),
        marker: await exists(stack.markerOf('vm1', p.name)),
      });
    }
    const oom = (await oomKills(driver, groups)) - oomBefore;
    return {
      variant: 'nestbroker',
      run,
      oomKills: oom,
      ended,
      gracefulEnds: ended.filter((e) => e.how === 'graceful').length,
      killedBySigkill: ended.filter((e) => e.how === 'SIGKILL').length,
      lowestPriorityWasTheOneStopped: ended.length === 1 && ended[0].name === LOWEST,
      workLost: ended.filter((e) => !e.marker).length,
      msUntilFree: freed ? r1(ms) : null,
      shield,
      vmUsageBeforeBytes: before,
      vmUsageAfterBytes: usage.memoryCurrent,
      vmLimitAfterBytes: limit,
      note: freed
        ? undefined
        : `notice ${v.state}; VM limit ${limit}, usage ${usage.memoryCurrent}`,
    };
  } finally {
    balloon?.child.kill('SIGKILL');
    await stack.teardown().catch(() => undefined);
    await fs.rm(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- main

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const a = parseArgs(argv, OPTIONS);
  if (a['real-guest'] !== undefined && a['real-guest'] !== 'true')
    throw new Error(`--real-guest takes no value, got "${a['real-guest']}"`);
  if (a['real-guest'] === undefined && (a.variants !== undefined || a['squeeze-seconds']))
    throw new Error('--variants and --squeeze-seconds go with --real-guest');
  requireRoot('bench/graceful-vs-oom');
  if (a['real-guest'] === 'true') {
    const variants = (a.variants ?? VARIANTS.join(',')).split(',').map((v) => v.trim());
    const unknown = variants.filter((v) => !(VARIANTS as readonly string[]).includes(v));
    if (unknown.length || variants.length === 0)
      throw new Error(
        `--variants: unknown ${unknown.map((v) => `"${v}"`).join(', ')}; known: ${VARIANTS.join(', ')}`,
      );
    return runRealGuest({
      runs: intArg(a.runs, 'runs', 3),
      variants: variants as Variant[],
      squeezeBoundMs: 1000 * numArg(a['squeeze-seconds'], 'squeeze-seconds', 180),
      out: a.out,
    });
  }
  const runs = intArg(a.runs, 'runs', 5);
  const base = a.root ?? `nestbroker-bench-${process.pid}`;
  say(
    `graceful-vs-oom: a ${VM_MEMORY_MIB} MiB "VM" cgroup, projects ${PROJECTS.map((p) => `${p.name} (priority ${p.priority})`).join(', ')} holding ${HOLD_MIB} MiB each; the VM loses ${SHRINK_MIB} MiB; ${runs} runs each; root ${base}`,
  );
  const results: RunResult[] = [];
  const onSignal = (): void => {
    void removeLeftoverRoot(base).finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    await openCgroupAdapter({ root: base, create: true });
    for (let run = 1; run <= runs; run++) {
      results.push(await runNothing(base, run));
      results.push(await runNestbroker(base, run));
      say(`  run ${run}/${runs} done`);
    }
  } finally {
    await removeLeftoverRoot(base).catch((err: unknown) => say(`cleanup: ${String(err)}`));
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }

  say('\nevery run');
  say(
    table([
      [
        'variant',
        'run',
        'VM MiB before→after',
        'OOM kills',
        'ended (how)',
        'graceful',
        'lowest stopped',
        'work lost',
        'ms until free',
      ],
      ...results.map((r) => [
        r.variant,
        r.run,
        `${r1(r.vmUsageBeforeBytes / MiB)}→${r1(r.vmUsageAfterBytes / MiB)}`,
        r.oomKills,
        r.ended.map((e) => `${e.name}(${e.how}${e.marker ? ',saved' : ''})`).join(' ') || 'none',
        r.gracefulEnds,
        r.lowestPriorityWasTheOneStopped ? 'yes' : 'NO',
        r.workLost,
        r.msUntilFree ?? `never${r.note ? `: ${r.note}` : ''}`,
      ]),
    ]),
  );
  const totals = tallyVariants(results, ['nothing', 'nestbroker']);
  say('\ntotals');
  say(totalsTable(totals));
  const goal = nestbrokerGoal(results);
  say(`\ngoal: ${goal.goal}: ${goal.met ? 'met' : 'NOT met'}`);
  const out = writeResult(
    'graceful-vs-oom',
    {
      runs,
      setup: {
        vmMemoryMiB: VM_MEMORY_MIB,
        shrinkMiB: SHRINK_MIB,
        holdMiB: HOLD_MIB,
        projects: PROJECTS,
      },
      results,
      totals,
      goal,
      realGuest:
        'measured separately: --real-guest writes bench/results/graceful-vs-oom-real-guest.json',
    },
    a.out,
  );
  say(`\nwrote ${out}`);
  return 0;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err instanceof Error ? err.stack : String(err));
      process.exit(1);
    },
  );
}
