/**
 * `make bench-libvirt-removal` (docs/performance.md, "Removal through libvirt";
 * docs/libvirt.md, "Figures"): how long a reclaim takes until the resource is gone in a
 * real guest under the machine's real libvirtd, split into the guest's cascade, the
 * libvirt call and the guest's own unplug, for each removal mode: `quota` against
 * `unplug` for CPUs, `virtio-mem` against `balloon` for memory.
 *
 * ONE boot of the real-guest test's Debian image as the TCG domain of
 * docs/libvirt/nbguest-tcg.xml (test/e2e/libvirt-vm.ts), the package installed in it,
 * two small projects (test/e2e/libvirt-vm.ts, libvirtGuestYaml), then
 *
 *   1. a host broker with cpuMode quota, memoryMode virtio-mem: N × (reclaim 256 MiB,
 *      restore), N × (reclaim 1 CPU, restore), interleaved;
 *   2. the agent started again from a fresh journal with the boot memory as its
 *      allocation, a host broker with cpuMode unplug, memoryMode balloon: N × (reclaim
 *      256 MiB, restore);
 *   3. last, one reclaim of 1 vCPU with unplug: under TCG only a restart of the domain
 *      gives the vCPU back (docs/libvirt.md, "Removal modes"), so it runs once.
 *
 * "Gone in the guest" is seen by a watcher in the guest, armed before the reclaim: a bash
 * loop of builtins only (no fork per poll; a 5 ms wait on a pipe nothing writes to) that
 * exits when MemTotal is down by the amount (within one virtio-mem block, 2 MiB; 4 MiB for
 * the balloon) or /sys/devices/system/cpu/online has lost the CPU. Its exit reaches the
 * host through the test runner's socket: the host's clock stamps it, like every other
 * time here (the host broker's issuedAt / outcomeAt / each step's calledAt on the same
 * wall clock), so no guest clock is trusted. The stamp is late by at most the poll and the
 * runner's one-way trip; the runner's round trip for `true`, measured in the same run, is
 * printed as that bound. A quota is gone when libvirt has set it (schedinfo read back:
 * libvirt's own cpu.max of the domain, which the kernel enforces from the next period,
 * Documentation/scheduler/sched-bwc.rst): no guest part.
 *
 * Split of a reclaim (ms, host clock):
 *   cascade       issuedAt → outcomeAt          the guest agent's whole cascade
 *   to the call   outcomeAt → step.calledAt     the host broker's reading of the domain
 *   call          step.callMs                   virsh's own return
 *   guest         step.calledAt → gone          the guest's unplug (or the balloon's
 *                                               inflation) after the call was made
 *   total         issuedAt → gone
 *
 * Prints a table, writes bench/results/libvirt-removal.json after every run (an
 * interrupted bench keeps what it measured). Logs in test/e2e/out/bench-libvirt/. The
 * domain, its files and its sockets are removed at the end, also on failure; libvirtd and
 * virtlogd are started only when not running, and then stopped by pid.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import type { LibvirtStep } from '../agent/host/actuator';
import { ensureLibvirtd, stopStarted, type StartedDaemon } from '../test/helpers/libvirt';
import {
  LIBVIRT_MARKERS,
  LIBVIRT_PROJECTS,
  LibvirtVm,
  libvirtGuestYaml,
  libvirtHostYaml,
  type CpuMode,
  type MemoryMode,
} from '../test/e2e/libvirt-vm';
import {
  HostBroker,
  REPO,
  buildImage,
  installNestbroker,
  packDeb,
  parseOomKills,
  sections,
  stopAgentAndProjects,
  waitStarted,
  writeGuestConfig,
} from '../test/e2e/scenario';
import { intArg, nowMs, parseArgs, r1, say, summarise, table, writeResult } from './lib/common';

const NAME = 'libvirt-removal';
const OUT = path.join(REPO, 'test/e2e/out/bench-libvirt');
const RECLAIM_MIB = 256;
/** docs/libvirt/nbguest-tcg.xml: 512 MiB boot memory + 256 MiB virtio-mem at start. */
const BOOT_MIB = 512;
const START_MIB = 768;
const NAMES = LIBVIRT_PROJECTS.map((p) => p.name);

/** The parts of the host's notice view (agent/host/api.ts) this bench reads. */
interface Notice {
  id: string;
  state: string;
  issuedAt: string;
  outcomeAt?: string;
  actuatedAt?: string;
  finishedAt?: string;
  outcome?: { projects?: { name: string; action: string }[] };
  actuation?: { status?: string; startedAt?: string; steps?: LibvirtStep[] };
  error?: { code?: string; message?: string };
}

export interface RemovalRun {
  mode: 'quota' | 'unplug' | 'virtio-mem' | 'balloon';
  run: number;
  state: string;
  status?: string;
  cascadeMs: number;
  toCallMs: number;
  callMs: number;
  /** From the call to gone in the guest (null for quota: libvirt's setting is the removal). */
  guestMs: number | null;
  /** The host broker's own wait until libvirt (or QEMU and the guest) showed it. */
  confirmMs: number;
  totalMs: number;
  /** nestctl reclaim's own wall time: the operator's wait. */
  operatorMs: number;
  memTotalDropKiB?: number;
  onlineAfter?: string;
  stopped: string[];
  restoreMs?: number;
  restoreState?: string;
  confirmedBy?: string;
}

function parseNotice(out: { code: number | null; stdout: string; stderr: string }): Notice {
  try {
    return JSON.parse(out.stdout) as Notice;
  } catch {
    throw new Error(`nestctl printed no notice (exit ${out.code}): ${out.stdout}${out.stderr}`);
  }
}

/**
 * A watcher in the guest that exits once `cond` (bash) holds; resolves with the host's
 * clock at its exit. Armed when this returns: its first act is a marker file, waited for.
 * The exit is handed back inside an object: an async function returning the promise itself
 * would wait for it.
 */
async function watch(vm: LibvirtVm, tag: string, cond: string, boundMs: number) {
  const armed = `/run/nbbench-${tag}.armed`;
  // fd 3: a pipe nothing writes to, opened read-write so it never reaches EOF: `read -t`
  // on it is a sleep without a fork (bash(1), "read").
  const script =
    `rm -f ${armed}; exec 3<> <(:); : >${armed}; n=0; ` +
    `until ${cond}; do read -t 0.005 -u 3 _; n=$((n+1)); done; echo "$n $EPOCHREALTIME"`;
  const gone = vm.run(script, boundMs).then((r) => ({ at: Date.now(), ...r }));
  await vm.sh(
    `i=0; until [ -e ${armed} ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done`,
  );
  return { gone };
}

const memBelow = (kib: number) => `{ read -r _ kb _ </proc/meminfo; (( kb <= ${kib} )); }`;
const memAtLeast = (kib: number) => `{ read -r _ kb _ </proc/meminfo; (( kb >= ${kib} )); }`;
const cpuOnlineIs = (list: string) =>
  `{ read -r on </sys/devices/system/cpu/online; [[ $on == ${list} ]]; }`;

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const a = parseArgs(argv, {
    runs: 'reclaims of each repeatable mode (default 3)',
    out: 'JSON file (default bench/results/libvirt-removal.json)',
  });
  const runs = intArg(a.runs, 'runs', 3);
  if (process.getuid?.() !== 0) throw new Error('libvirt-removal runs as root (libvirtd, cgroups)');
  const t0 = nowMs();
  const domain = `nbbench-${process.pid}`;
  const socket = `/tmp/nb-lv-bench-${process.pid}.sock`;
  const results: RemovalRun[] = [];
  const body: Record<string, unknown> = { domain, runs, reclaimMiB: RECLAIM_MIB, results };
  const save = () => writeResult(NAME, body, a.out);
  let daemons: StartedDaemon[] = [];
  let vm: LibvirtVm | undefined;
  let broker: HostBroker | undefined;
  await fsp.rm(OUT, { recursive: true, force: true });
  await fsp.mkdir(OUT, { recursive: true });
  try {
    daemons = await ensureLibvirtd();
    const image = await buildImage(OUT);
    say(`image ${image.dir}; defining ${domain} (the first define probes QEMU: minutes)`);
    vm = await LibvirtVm.define({ name: domain, imageDir: image.dir, outDir: OUT, shareDir: REPO });
    await vm.start();
    await vm.virtioMemSettled();
    const guest = vm;
    const deb = await packDeb(OUT);
    await installNestbroker(guest, deb);
    await writeGuestConfig(guest, libvirtGuestYaml(START_MIB));
    await guest.sh('systemctl enable --now nestbroker-guest.service', 120_000);
    if ((await waitStarted(guest, LIBVIRT_MARKERS, 120_000, NAMES)).code !== 0)
      throw new Error('the projects did not start');
    body.setupMs = nowMs() - t0;
    body.timings = guest.timings;

    // The detection bound: the runner's round trip for a command that does nothing.
    const rtt: number[] = [];
    for (let i = 0; i < 5; i++) {
      const s = Date.now();
      await guest.sh('true');
      rtt.push(Date.now() - s);
    }
    body.runnerRoundTripMs = summarise(rtt);

    const startBroker = async (cpuMode: CpuMode, memoryMode: MemoryMode, dir: string) => {
      broker = await HostBroker.start(libvirtHostYaml(domain, cpuMode, memoryMode), dir, socket);
      const g = await broker.waitConnected(120_000);
      if (!/"connected": true/.test(g.stdout))
        throw new Error(`the agent did not connect: ${g.stdout}${g.stderr}`);
      return broker;
    };

    /** One reclaim and (unless `restore` is false) its restore, measured. */
    const removal = async (
      b: HostBroker,
      mode: RemovalRun['mode'],
      run: number,
      restore = true,
    ): Promise<RemovalRun> => {
      const memory = mode === 'virtio-mem' || mode === 'balloon';
      const tolKiB = mode === 'balloon' ? 4096 : 2048;
      const before = await guest.memTotalKiB();
      const tag = `${mode}-${run}`;
      const gone = memory
        ? await watch(guest, tag, memBelow(before - RECLAIM_MIB * 1024 + tolKiB), 240_000)
        : mode === 'unplug'
          ? await watch(guest, tag, cpuOnlineIs('0'), 240_000)
          : null;
      await guest.sh(`rm -f ${LIBVIRT_MARKERS}/*.started`);
      const args = memory ? ['--memory', `${RECLAIM_MIB}MiB`] : ['--cpus', '1'];
      const r = await b.nestctl(
        ['reclaim', 'vm1', ...args, '--deadline', '60s', '--json'],
        300_000,
      );
      const n = parseNotice(r);
      const seen = gone ? await gone.gone : null;
      if (seen && seen.code !== 0)
        throw new Error(`${tag}: the watcher in the guest did not see it gone: ${seen.stderr}`);
      const at = (s?: string) => (s ? Date.parse(s) : NaN);
      const step = n.actuation?.steps?.find((s) => s.resource === (memory ? 'memory' : 'cpus'));
      if (!step?.calledAt) throw new Error(`${tag}: no libvirt call in the notice: ${r.stdout}`);
      const goneAt = seen ? seen.at : at(n.actuatedAt);
      const row: RemovalRun = {
        mode,
        run,
        state: n.state,
        status: n.actuation?.status,
        cascadeMs: at(n.outcomeAt) - at(n.issuedAt),
        toCallMs: at(step.calledAt) - at(n.outcomeAt),
        callMs: step.callMs,
        guestMs: seen ? seen.at - at(step.calledAt) : null,
        confirmMs: step.confirmMs,
        totalMs: goneAt - at(n.issuedAt),
        operatorMs: r.ms,
        stopped: (n.outcome?.projects ?? [])
          .filter((p) => p.action === 'stopped')
          .map((p) => p.name),
        confirmedBy: step.confirmedBy,
      };
      if (memory) row.memTotalDropKiB = before - (await guest.memTotalKiB());
      else row.onlineAfter = (await guest.sh('cat /sys/devices/system/cpu/online')).trim();
      if (restore) {
        const back = memory
          ? await watch(guest, `${tag}-back`, memAtLeast(before - tolKiB), 240_000)
          : null;
        const rr = await b.nestctl(['restore', 'vm1', '--json'], 300_000);
        const bn = parseNotice(rr);
        if (back) await back.gone;
        if (mode === 'virtio-mem') await guest.virtioMemSettled();
        row.restoreMs = rr.ms;
        row.restoreState = bn.state;
        // Every project stopped for room is started again before the next run.
        if ((await waitStarted(guest, LIBVIRT_MARKERS, 120_000, row.stopped)).code !== 0)
          throw new Error(
            `${tag}: ${row.stopped.join(', ')} did not start again after the restore`,
          );
      }
      results.push(row);
      save();
      say(
        `${tag}: ${row.state}, total ${row.totalMs} ms (cascade ${row.cascadeMs}, call ${row.callMs}, guest ${row.guestMs ?? '-'})`,
      );
      return row;
    };

    // 1. quota and virtio-mem, interleaved.
    const a1 = await startBroker('quota', 'virtio-mem', path.join(OUT, 'quota-virtio-mem'));
    for (let i = 1; i <= runs; i++) {
      await removal(a1, 'virtio-mem', i);
      await removal(a1, 'quota', i);
    }
    await a1.stop();
    broker = undefined;

    // 2. balloon: the books hold the boot memory (docs/libvirt.md, "Configuration"), so
    // the agent's allocation must say the same, from a fresh journal.
    await writeGuestConfig(guest, libvirtGuestYaml(BOOT_MIB));
    await stopAgentAndProjects(guest);
    await guest.sh(
      `rm -rf /var/lib/nestbroker/guest ${LIBVIRT_MARKERS} && systemctl start nestbroker-guest`,
      120_000,
    );
    if ((await waitStarted(guest, LIBVIRT_MARKERS, 120_000, NAMES)).code !== 0)
      throw new Error('the projects did not start again');
    const b2 = await startBroker('unplug', 'balloon', path.join(OUT, 'unplug-balloon'));
    for (let i = 1; i <= runs; i++) await removal(b2, 'balloon', i);

    // 3. unplug, once, last (QEMU 7.2 crashed when virtio-mem still plugged: settled first).
    await guest.virtioMemSettled();
    await removal(b2, 'unplug', 1, false);

    const k = await sections(guest, { dmesg: 'dmesg', vmstat: 'grep -w oom_kill /proc/vmstat' });
    body.oomKills = { dmesg: parseOomKills(k.dmesg).length, vmstat: k.vmstat };
  } finally {
    await (broker as HostBroker | undefined)?.stop();
    if (vm) await vm.cleanup();
    await stopStarted(daemons);
    await fsp.rm(socket, { force: true });
    body.totalMs = nowMs() - t0;
    save();
  }

  const rows: (string | number | null)[][] = [
    [
      'mode',
      'n',
      'done',
      'cascade p50',
      'to the call',
      'call p50',
      'guest p50',
      'total p50',
      'total max',
      'operator p50',
    ],
  ];
  for (const mode of ['quota', 'unplug', 'virtio-mem', 'balloon'] as const) {
    const rs = results.filter((r) => r.mode === mode);
    if (!rs.length) continue;
    const p50 = (f: (r: RemovalRun) => number | null) => {
      const xs = rs.map(f).filter((x): x is number => x !== null);
      return xs.length ? r1(summarise(xs).p50) : null;
    };
    rows.push([
      mode,
      rs.length,
      rs.filter((r) => r.state === 'done').length,
      p50((r) => r.cascadeMs),
      p50((r) => r.toCallMs),
      p50((r) => r.callMs),
      p50((r) => r.guestMs),
      p50((r) => r.totalMs),
      Math.max(...rs.map((r) => r.totalMs)),
      p50((r) => r.operatorMs),
    ]);
  }
  say(table(rows));
  const rt = body.runnerRoundTripMs as { p50: number; max: number };
  say(
    `ms, host clock; "guest" is late by at most the watcher's 5 ms poll and the runner's one-way trip (its round trip: p50 ${rt.p50}, max ${rt.max} ms)`,
  );
  say(`results: ${a.out ?? path.join(REPO, 'bench/results', `${NAME}.json`)}`);
  return results.every((r) => r.state === 'done') ? 0 : 1;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (err: Error) => {
      process.stderr.write(`${err.stack ?? err.message}\n`);
      process.exit(1);
    },
  );
}
