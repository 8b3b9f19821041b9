/**
 * The real guest's workload and how a squeeze of it is handled, shared by the real-guest
 * test (guest.e2e.test.ts) and by `bench/graceful-vs-oom --real-guest` (docs/performance.md
 * part 3). One booted guest (vm.ts) runs every variant in turn:
 *
 *   nothing       the balloon inflates; the guest kernel's OOM killer decides
 *   nestbroker    `reclaim` at the host broker: notice, the agent stops the lowest-priority
 *                 project gracefully, outcome, then the broker inflates the balloon
 *   earlyoom      the balloon inflates with Debian's earlyoom running, its defaults
 *   systemd-oomd  the balloon inflates with Debian's systemd-oomd running, its defaults
 *
 * Each run starts from a clean slate (every daemon and project of the previous run gone,
 * the balloon back at the VM's size), starts fresh projects, squeezes the guest to
 * SCENARIO.squeezedMiB and counts, from the guest kernel and the host's QMP:
 * OOM kills (/proc/vmstat oom_kill, and who in dmesg), how each project that ended ended
 * (its unit's exit status, its marker), whether the lowest-priority project was the one
 * stopped, work lost (ended without its marker), and the time until the balloon actually
 * reached its target (query-balloon `actual`, polled from the host: the memory is free).
 *
 * Every guest command and every wait is bounded: a squeezed guest may stall (seen here:
 * soft lockups until the balloon lets go), so the squeeze itself is watched from the host.
 */
import { execFile, spawn, type ChildProcess } from 'child_process';
import { promises as fsp, createWriteStream, existsSync } from 'fs';
import * as path from 'path';
import { rpcCall } from '../../agent/common/rpc';
import { Vm, withTimeout, type GuestShell } from './vm';

/** The repository: this file runs from test/e2e/ (ts-jest) or dist/test/e2e/ (the bench). */
const UP2 = path.resolve(__dirname, '..', '..');
export const REPO = path.basename(UP2) === 'dist' ? path.resolve(UP2, '..') : UP2;
export const MiB = 1024 * 1024;

/**
 * The workload, the same in every variant. Measured in the guest: idle it uses ~186 MiB of
 * its 958 MiB MemTotal; a project is charged what it holds + ~6–8 MiB (node's text is
 * shared page cache); MemTotal is ~320 MiB lower after the balloon takes 320 MiB.
 * Squeezed to 704 MiB (MemTotal ~638 MiB):
 * - with nestbroker: batch stops; OS + agent + db + web ≈ 186 + 60 + 308 + 30 = 584 fit;
 * - balloon alone: OS + db + web + batch ≈ 752 MiB do not (no swap): the OOM killer must
 *   kill, and it picks by size: `db`, the MOST important project.
 */
export const SCENARIO = {
  vmMemoryMiB: 1024,
  squeezedMiB: 704,
  markers: '/var/lib/nestbroker/e2e-markers',
  projects: [
    { name: 'db', priority: 100, holdMiB: 300, memory: { min: '320MiB', max: '384MiB' } },
    { name: 'web', priority: 50, holdMiB: 24, memory: { min: '48MiB', max: '96MiB' } },
    { name: 'batch', priority: 10, holdMiB: 220, memory: { min: '240MiB', max: '288MiB' } },
  ],
} as const;
export type ScenarioProject = (typeof SCENARIO.projects)[number];
export const PROJECT_NAMES = SCENARIO.projects.map((p) => p.name);
/** The one that should be stopped: the lowest priority (batch). */
export const LOWEST = [...SCENARIO.projects].sort((a, b) => a.priority - b.priority)[0].name;
/** The agent's unit cgroup; its projects are in projects/<name>. */
export const AGENT_CG = '/sys/fs/cgroup/system.slice/nestbroker-guest.service';
/** Markers of the projects run as plain services (no nestbroker): <dir>/<variant>-<run>/. */
export const UNMANAGED_MARKERS = '/var/lib/graceful-vs-oom';

export const VARIANTS = ['nothing', 'nestbroker', 'earlyoom', 'systemd-oomd'] as const;
export type Variant = (typeof VARIANTS)[number];
export type UnmanagedVariant = Exclude<Variant, 'nestbroker'>;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function workloadArgv(p: ScenarioProject, markers: string): string[] {
  return [
    '/usr/bin/node',
    '/mnt/code/test/e2e/guest/workload.js',
    p.name,
    String(p.holdMiB),
    markers,
  ];
}

/** /etc/nestbroker/guest.yaml of the guest agent: the SCENARIO's projects. */
export function guestYaml(): string {
  const projects = SCENARIO.projects
    .map(
      (p) => `  - name: ${p.name}
    priority: ${p.priority}
    memory: { min: ${p.memory.min}, max: ${p.memory.max} }
    cpu: { min: 0.25, max: 2 }
    stop: { signal: SIGTERM, gracePeriod: 20s }
    restartOnRestore: true
    command:
      argv: [${workloadArgv(p, SCENARIO.markers)
        .map((a) => JSON.stringify(a))
        .join(', ')}]`,
    )
    .join('\n');
  return `guest: vm1
resources: { cpus: 2, memory: ${SCENARIO.vmMemoryMiB}MiB }
# The OS, journald, the test runner and the agent itself (~186 MiB idle + ~55 MiB agent).
reserve: { memory: 240MiB, cpus: 0 }
upstream: { transport: virtio-serial, path: /dev/virtio-ports/org.nestbroker.0 }
projects:
${projects}
`;
}

export function hostYaml(vm: Vm, stateDir: string, socket: string): string {
  return `stateDir: ${stateDir}
socket: ${socket}
guests:
  - name: vm1
    priority: 10
    allocation: { cpus: 2, memory: ${SCENARIO.vmMemoryMiB}MiB }
    floor: { cpus: 1, memory: 384MiB }
    channel: { transport: unix, path: ${vm.channelSocket} }
    qmp: ${vm.brokerQmpSocket}
`;
}

/** execFile, bounded, resolving with stdout; rejects with the end of stderr. */
export function runFile(
  file: string,
  args: string[],
  timeoutMs: number,
  cwd = REPO,
): Promise<string> {
  return withTimeout(
    `${file} ${args.join(' ')}`,
    timeoutMs,
    new Promise<string>((resolve, reject) =>
      execFile(file, args, { cwd, maxBuffer: 64 * MiB }, (err, stdout, stderr) =>
        err
          ? reject(new Error(`${file} failed: ${err.message}\n${stderr.slice(-3000)}`))
          : resolve(stdout),
      ),
    ),
  );
}

export interface ImageInfo {
  dir: string;
  buildOrLookupMs: number;
  builtWith: unknown;
}

/** Builds (or finds in the cache) the guest image with build-image.sh. */
export async function buildImage(outDir: string): Promise<ImageInfo> {
  const t0 = Date.now();
  await fsp.mkdir(outDir, { recursive: true });
  const dir = await withTimeout(
    'build-image.sh',
    15 * 60_000,
    new Promise<string>((resolve, reject) =>
      execFile(
        path.join(REPO, 'test/e2e/build-image.sh'),
        { maxBuffer: 64 * MiB },
        (err, stdout, stderr) => {
          void fsp.writeFile(path.join(outDir, 'build-image.log'), stderr);
          if (err)
            reject(new Error(`build-image.sh failed: ${err.message}\n${stderr.slice(-3000)}`));
          else resolve(stdout.trim().split('\n').pop() ?? '');
        },
      ),
    ),
  );
  const builtWith = JSON.parse(
    await fsp.readFile(path.join(dir, 'timings.json'), 'utf8'),
  ) as unknown;
  return { dir, buildOrLookupMs: Date.now() - t0, builtWith };
}

/**
 * The Debian package, as an operator installs it (docs/install.md "Installing the Debian
 * package"): `make deb` here (a no-op when the packaging test already built it from this
 * tree), copied into the share (outDir must be inside REPO). Returns its path in the guest.
 */
export async function packDeb(outDir: string): Promise<string> {
  await runFile('make', ['--no-print-directory', 'deb'], 15 * 60_000);
  const built = (await fsp.readdir(path.join(REPO, 'dist'))).filter((f) =>
    /^nestbroker_.+_all\.deb$/.test(f),
  );
  if (built.length !== 1) throw new Error(`make deb left ${built.length} packages in dist/`);
  const deb = path.join(outDir, built[0]);
  const rel = path.relative(REPO, deb);
  if (rel.startsWith('..')) throw new Error(`${deb} is outside the shared tree ${REPO}`);
  await fsp.copyFile(path.join(REPO, 'dist', built[0]), deb);
  return `/mnt/code/${rel}`;
}

/**
 * Installs the package in the guest with apt-get, from a copy on the guest's own disk
 * (apt's download sandbox user cannot read the 9p share). Its one dependency, Debian's
 * nodejs, is in the image already, so no network is needed.
 */
export async function installNestbroker(vm: GuestShell, guestDeb: string): Promise<string> {
  const local = `/tmp/${path.basename(guestDeb)}`;
  return vm.sh(
    `cp ${guestDeb} ${local} && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${local} 2>&1`,
    300_000,
  );
}

export async function writeGuestConfig(vm: GuestShell, yaml = guestYaml()): Promise<void> {
  await vm.sh(`mkdir -p /etc/nestbroker && cat >/etc/nestbroker/guest.yaml <<'YAML'\n${yaml}YAML`);
}

/** Waits (bounded) until every project wrote its `.started` marker in `markers`. */
export function waitStarted(
  vm: GuestShell,
  markers: string,
  timeoutMs = 120_000,
  names: readonly string[] = PROJECT_NAMES,
) {
  return vm.run(
    `for p in ${names.join(' ')}; do i=0; until [ -f ${markers}/$p.started ]; do ` +
      `i=$((i+1)); [ $i -gt ${Math.round(timeoutMs / 100)} ] && exit 1; sleep 0.1; done; done`,
    timeoutMs + 10_000,
  );
}

export function meminfoKiB(text: string, key: string): number {
  const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text);
  if (!m) throw new Error(`no ${key} in /proc/meminfo`);
  return Number(m[1]);
}

/** One query-balloon: the guest's memory size as the balloon sees it (bytes). */
export async function balloonActual(vm: Vm): Promise<number> {
  return (await vm.qmp.execute<{ actual: number }>('query-balloon')).actual;
}

/**
 * Asks the balloon for `bytes` and polls query-balloon until `actual` reaches it (from
 * above when inflating, from below when letting go), stops moving for `stableMs`, or
 * `maxMs` pass.
 */
export async function balloonTo(vm: Vm, bytes: number, maxMs: number, stableMs = 10_000) {
  const t0 = Date.now();
  const from = await balloonActual(vm);
  await vm.qmp.execute('balloon', { value: bytes });
  return watchBalloon(vm, bytes, from > bytes ? 'down' : 'up', t0, {
    maxMs,
    stableMs,
    pollMs: 500,
  });
}

export interface BalloonWatch {
  reached: boolean;
  actual: number;
  /** ms from t0 until `actual` reached the target (or until the watch gave up). */
  ms: number;
  /** Every change of `actual` seen, and the first and last sample. */
  samples: { ms: number; actualMiB: number }[];
}

/**
 * Polls query-balloon (from the host: it needs nothing from a guest that may be stalled)
 * until `actual` is at or past `bytes` in `direction`, or `maxMs` pass since t0, or it did
 * not move for `stableMs`, or `stop()` says so.
 */
export async function watchBalloon(
  vm: Vm,
  bytes: number,
  direction: 'down' | 'up',
  t0: number,
  o: { maxMs: number; stableMs?: number; pollMs?: number; stop?: () => boolean },
): Promise<BalloonWatch> {
  const samples: BalloonWatch['samples'] = [];
  let last = -1;
  let stableSince = Date.now();
  for (;;) {
    const actual = await balloonActual(vm);
    const ms = Date.now() - t0;
    if (actual !== last) samples.push({ ms, actualMiB: Math.round(actual / MiB) });
    if (direction === 'down' ? actual <= bytes : actual >= bytes)
      return { reached: true, actual, ms, samples };
    if (actual !== last) {
      last = actual;
      stableSince = Date.now();
    }
    if (
      ms > o.maxMs ||
      Date.now() - stableSince > (o.stableMs ?? Infinity) ||
      (o.stop?.() ?? false)
    ) {
      samples.push({ ms, actualMiB: Math.round(actual / MiB) });
      return { reached: false, actual, ms, samples };
    }
    await sleep(o.pollMs ?? 250);
  }
}

export interface OomKill {
  pid: number;
  comm: string;
  cgroup: string | null;
  anonRssKiB: number | null;
}

/** "Out of memory: Killed process 123 (node) total-vm:..." and the oom-kill summary line. */
export function parseOomKills(dmesg: string): OomKill[] {
  const kills: OomKill[] = [];
  for (const m of dmesg.matchAll(
    /Out of memory: Killed process (\d+) \(([^)]*)\)[^\n]*?anon-rss:(\d+)kB/g,
  ))
    kills.push({ pid: Number(m[1]), comm: m[2], cgroup: null, anonRssKiB: Number(m[3]) });
  for (const m of dmesg.matchAll(/oom-kill:[^\n]*task_memcg=([^,\s]+),task=([^,]+),pid=(\d+)/g)) {
    const k = kills.find((x) => x.pid === Number(m[3]));
    if (k) k.cgroup = m[1];
  }
  return kills;
}

export function softLockups(dmesg: string): number {
  return (dmesg.match(/soft lockup - CPU#\d+ stuck for \d+s/g) ?? []).length;
}

/**
 * Runs several commands in ONE guest request (a round trip costs ~0.5 s of node start-up
 * under TCG) and returns each one's output by name. Never throws for a failing command.
 */
export async function sections(
  vm: GuestShell,
  parts: Record<string, string>,
  timeoutMs = 60_000,
): Promise<Record<string, string>> {
  const script = Object.entries(parts)
    .map(([k, cmd]) => `echo '=== ${k}'; { ${cmd}\n} 2>&1`)
    .join('; ');
  const r = await vm.run(script, timeoutMs);
  const out: Record<string, string> = {};
  let cur: string | null = null;
  for (const line of r.stdout.split('\n')) {
    const m = /^=== (\S+)$/.exec(line);
    if (m && m[1] in parts) {
      cur = m[1];
      out[cur] = '';
    } else if (cur !== null) out[cur] += line + '\n';
  }
  for (const k of Object.keys(parts)) out[k] = (out[k] ?? '').replace(/\n+$/, '');
  return out;
}

const vmstatOomKills = (text: string): number => Number(/oom_kill (\d+)/.exec(text)?.[1] ?? NaN);

/** "name value" lines → { name: value }. */
function pairs(text: string): Record<string, string> {
  return Object.fromEntries(
    text
      .split('\n')
      .map((l) => /^(\S+) ?(.*)$/.exec(l))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => [m[1], m[2]]),
  );
}

export interface EndedProject {
  name: string;
  priority: number;
  /** graceful (its SIGTERM handler saved its work and it exited 0), SIGKILL, or what else */
  how: string;
  /** its marker ("work saved") exists */
  marker: boolean;
  /** who ended it: nestbroker, earlyoom, systemd-oomd, the kernel OOM killer, unknown */
  by: string;
}

export interface VariantRun {
  variant: Variant;
  run: number;
  /** /proc/vmstat oom_kill, after − before: every OOM kill by the guest kernel */
  oomKills: number;
  /** who the kernel killed (dmesg) */
  oomKilled: OomKill[];
  /** what the userspace daemon (earlyoom, systemd-oomd) says it did, from its journal */
  daemonActions: string[];
  ended: EndedProject[];
  gracefulEnds: number;
  killedBySigkill: number;
  lowestPriorityWasTheOneStopped: boolean;
  /** projects that ended without saving their work */
  workLost: number;
  /** ms from the squeeze's start until query-balloon `actual` reached the target */
  msUntilFree: number | null;
  balloon: BalloonWatch & { targetMiB: number; actualMiB: number };
  /** when the balloon did not get there: did the guest still run a command (null: not asked) */
  guestAnsweredWhileSqueezed: boolean | null;
  softLockups: number;
  memTotalKiBBefore: number;
  projectMemoryMiBBefore: Record<string, number>;
  /** the daemon's configuration as it ran (earlyoom, systemd-oomd) */
  daemon?: Record<string, string>;
  /** nestbroker: the notice as the host broker reported it */
  notice?: Record<string, unknown>;
  phasesMs: Record<string, number>;
  note?: string;
}

export interface RunOptions {
  /** How long the squeeze is watched before it counts as never freed. */
  squeezeBoundMs: number;
  /** How long the guest is held at the squeezed size once the balloon got there. */
  holdMs?: number;
  log?: (line: string) => void;
}

function tally(ended: EndedProject[]) {
  return {
    gracefulEnds: ended.filter((e) => e.how === 'graceful').length,
    killedBySigkill: ended.filter((e) => e.how === 'SIGKILL').length,
    lowestPriorityWasTheOneStopped: ended.length === 1 && ended[0].name === LOWEST,
    workLost: ended.filter((e) => !e.marker).length,
  };
}

/** The plain service a project runs as when nestbroker does not run it. */
export const unitOf = (name: string): string => `gvo-${name}.service`;

const DAEMON_UNIT: Record<UnmanagedVariant, string | null> = {
  nothing: null,
  earlyoom: 'earlyoom.service',
  'systemd-oomd': 'systemd-oomd.service',
};

/**
 * The guest agent stopped and every project in its cgroup killed (the unit's
 * KillMode=process leaves projects running when the agent stops).
 */
const STOP_AGENT =
  `systemctl stop nestbroker-guest.service 2>/dev/null; ` +
  `if [ -d ${AGENT_CG} ]; then echo 1 >${AGENT_CG}/cgroup.kill; i=0; ` +
  `while grep -q 'populated 1' ${AGENT_CG}/cgroup.events; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.1; done; fi; true`;

export async function stopAgentAndProjects(vm: GuestShell): Promise<void> {
  await vm.run(STOP_AGENT, 120_000);
}

/**
 * Everything any variant started, gone: the daemons, the plain project services, the
 * guest agent and every project in its cgroup; the balloon back at the VM's size.
 */
export async function cleanSlate(vm: Vm): Promise<void> {
  const units = PROJECT_NAMES.map(unitOf).join(' ');
  await vm.run(
    `systemctl stop earlyoom.service systemd-oomd.service systemd-oomd.socket dbus.service dbus.socket ${units} 2>/dev/null; ` +
      `systemctl reset-failed ${units} earlyoom.service systemd-oomd.service 2>/dev/null; ` +
      STOP_AGENT,
    120_000,
  );
  const w = await balloonTo(vm, SCENARIO.vmMemoryMiB * MiB, 60_000);
  if (!w.reached)
    throw new Error(`the balloon did not let go: actual ${Math.round(w.actual / MiB)} MiB`);
}

/** The squeeze, watched from the host; then held, and let go. */
async function squeeze(
  vm: Vm,
  o: RunOptions,
  t0: number,
  stop?: () => boolean,
): Promise<{ watch: BalloonWatch; answered: boolean | null }> {
  const target = SCENARIO.squeezedMiB * MiB;
  const watch = await watchBalloon(vm, target, 'down', t0, {
    maxMs: o.squeezeBoundMs,
    stop,
  });
  let answered: boolean | null = null;
  if (!watch.reached)
    answered = await withTimeout('a squeezed guest running `true`', 10_000, vm.run('true', 5000))
      .then((r) => r.code === 0)
      .catch(() => false);
  else await sleep(o.holdMs ?? 5000);
  return { watch, answered };
}

/**
 * What every kind of run reads off the guest the same way: the kernel's OOM kills (the
 * vmstat counter and dmesg's victims), the tally of the projects that ended, how long the
 * memory took to come free, and the guest before the squeeze.
 */
function readOff(
  before: Record<string, string>,
  after: Record<string, string>,
  kills: OomKill[],
  ended: EndedProject[],
  watch: BalloonWatch,
  answered: boolean | null,
) {
  const memory = pairs(before.memory);
  return {
    oomKills: vmstatOomKills(after.vmstat) - vmstatOomKills(before.vmstat),
    oomKilled: kills,
    ended,
    ...tally(ended),
    msUntilFree: watch.reached ? watch.ms : null,
    balloon: balloonOf(watch),
    guestAnsweredWhileSqueezed: answered,
    softLockups: softLockups(after.dmesg),
    memTotalKiBBefore: meminfoKiB(before.meminfo, 'MemTotal'),
    projectMemoryMiBBefore: Object.fromEntries(
      PROJECT_NAMES.map((p) => [p, Math.round(Number(memory[p]) / MiB)]),
    ),
  };
}

function balloonOf(watch: BalloonWatch) {
  return {
    targetMiB: SCENARIO.squeezedMiB,
    actualMiB: Math.round(watch.actual / MiB),
    ...watch,
  };
}

/** `systemctl show` lines of a project's unit → how it ended (null: still running). */
function howEnded(show: string, marker: boolean): string | null {
  const p = Object.fromEntries(
    show
      .split(/\s+/)
      .map((kv) => kv.split('='))
      .filter((kv) => kv.length === 2),
  ) as Record<string, string>;
  if (p.SubState === 'running' || p.SubState === 'start') return null;
  const code = Number(p.ExecMainCode);
  const status = Number(p.ExecMainStatus);
  // ExecMainCode is the CLD_* code of waitid(2): 1 exited, 2 killed, 3 dumped.
  if (code === 1 && status === 0) return marker ? 'graceful' : 'exit 0 without marker';
  if (code === 1) return `exit ${status}`;
  if (code === 2 || code === 3) return status === 9 ? 'SIGKILL' : `signal ${status}`;
  return `unknown (${show.trim()})`;
}

/**
 * What the daemon says it did: earlyoom's "sending SIGTERM to process N" and "escalating to
 * SIGKILL" (when memory fell below its SIGKILL limit too: seen right after the SIGTERM),
 * systemd-oomd's "Killed <cgroup> due to ...".
 */
function daemonActions(variant: Variant, log: string): string[] {
  const re =
    variant === 'earlyoom'
      ? /(?:sending SIG\w+ to process \d+|escalating to SIGKILL)[^\n]*/g
      : variant === 'systemd-oomd'
        ? /Killed \S+ due to[^\n]*/g
        : null;
  return re ? (log.match(re) ?? []) : [];
}

function whoEnded(
  variant: Variant,
  name: string,
  pid: number | undefined,
  kills: OomKill[],
  actions: string[],
): string {
  if (pid !== undefined && kills.some((k) => k.pid === pid)) return 'kernel OOM killer';
  if (variant === 'earlyoom' && actions.some((a) => a.includes(`to process ${pid} `)))
    return 'earlyoom';
  if (variant === 'systemd-oomd' && actions.some((a) => a.includes(unitOf(name))))
    return 'systemd-oomd';
  return 'unknown';
}

/** The daemon's configuration as it runs: what the JSON records for the reader. */
const DAEMON_CONFIG: Record<UnmanagedVariant, Record<string, string>> = {
  nothing: {},
  earlyoom: {
    package: "dpkg-query -W -f '${Package} ${Version}\\n' earlyoom",
    defaults: "grep -v '^#' /etc/default/earlyoom | grep .",
    commandLine: 'ps -o args= -C earlyoom',
    startup:
      'journalctl -o cat _SYSTEMD_INVOCATION_ID=$(systemctl show -p InvocationID --value earlyoom.service) | head -8',
  },
  'systemd-oomd': {
    package: "dpkg-query -W -f '${Package} ${Version}\\n' systemd-oomd",
    catConfig: "systemd-analyze cat-config systemd/oomd.conf | grep -v '^#' | grep .",
    oomctl: 'oomctl',
    managedOOM:
      'for u in -.slice system.slice user.slice ' +
      PROJECT_NAMES.map(unitOf).join(' ') +
      '; do echo "$u $(systemctl show -p ManagedOOMSwap,ManagedOOMMemoryPressure,ManagedOOMMemoryPressureLimit -- $u | paste -sd" ")"; done',
    startup:
      'journalctl -o cat _SYSTEMD_INVOCATION_ID=$(systemctl show -p InvocationID --value systemd-oomd.service) | head -8',
  },
};

/** Times the phases of one run: `lap(name)` records the time since the previous lap. */
function phaseClock(): { phasesMs: Record<string, number>; lap: (name: string) => void } {
  const phasesMs: Record<string, number> = {};
  let t = Date.now();
  return {
    phasesMs,
    lap: (name) => {
      phasesMs[name] = Date.now() - t;
      t = Date.now();
    },
  };
}

/**
 * (a) nothing, (c) earlyoom, (d) systemd-oomd: the projects as plain services
 * (systemd-run, what a guest without nestbroker has), the daemon of the variant started
 * as Debian ships it, then the balloon inflates to SCENARIO.squeezedMiB.
 */
export async function runUnmanaged(
  vm: Vm,
  variant: UnmanagedVariant,
  run: number,
  o: RunOptions,
): Promise<VariantRun> {
  const say = o.log ?? (() => undefined);
  const { phasesMs, lap } = phaseClock();
  await cleanSlate(vm);
  lap('cleanSlate');
  const markers = `${UNMANAGED_MARKERS}/${variant}-${run}`;
  const unit = DAEMON_UNIT[variant];
  await vm.sh(`rm -rf ${markers} && mkdir -p ${markers}`);
  // dbus first, for oomctl only: systemd-oomd watches through PID 1's varlink, not D-Bus.
  if (variant === 'systemd-oomd') await vm.sh('systemctl start dbus.service', 60_000);
  if (unit) await vm.sh(`systemctl start ${unit} && systemctl is-active ${unit}`, 60_000);
  for (const p of SCENARIO.projects)
    await vm.sh(
      `systemd-run --unit=${unitOf(p.name)} --remain-after-exit ${workloadArgv(p, markers).join(' ')}`,
    );
  const up = await waitStarted(vm, markers);
  if (up.code !== 0) throw new Error(`${variant} run ${run}: the projects did not start`);
  lap('setup');
  const token = `graceful-vs-oom ${variant} run ${run} ${Date.now()}`;
  const before = await sections(vm, {
    meminfo: 'cat /proc/meminfo',
    vmstat: 'grep -w oom_kill /proc/vmstat',
    memory: PROJECT_NAMES.map(
      (p) => `echo "${p} $(systemctl show -p MemoryCurrent --value ${unitOf(p)})"`,
    ).join('; '),
    pids: PROJECT_NAMES.map((p) => `echo "${p} $(cut -d' ' -f1 ${markers}/${p}.started)"`).join(
      '; ',
    ),
    ...(unit ? DAEMON_CONFIG[variant] : {}),
    // Everything the kernel logs from here on belongs to this run.
    kmsg: `echo '${token}' >/dev/kmsg`,
  });
  lap('before');
  say(`${variant} run ${run}: squeezing to ${SCENARIO.squeezedMiB} MiB`);
  const t0 = Date.now();
  await vm.qmp.execute('balloon', { value: SCENARIO.squeezedMiB * MiB });
  const { watch, answered } = await squeeze(vm, o, t0);
  lap('squeeze');
  await balloonTo(vm, SCENARIO.vmMemoryMiB * MiB, 60_000);
  const after = await sections(
    vm,
    {
      vmstat: 'grep -w oom_kill /proc/vmstat',
      dmesg: `dmesg | sed -n '/${token}/,$p'`,
      units: PROJECT_NAMES.map(
        (p) =>
          `echo "${p} $(systemctl show -p SubState,ExecMainCode,ExecMainStatus ${unitOf(p)} | paste -sd' ')"`,
      ).join('; '),
      markers: `ls ${markers}`,
      ...(unit
        ? {
            daemonLog: `journalctl -o cat _SYSTEMD_INVOCATION_ID=$(systemctl show -p InvocationID --value ${unit})`,
            daemonState: `systemctl is-active ${unit}`,
          }
        : {}),
    },
    180_000,
  );
  lap('collect');
  const kills = parseOomKills(after.dmesg);
  const actions = daemonActions(variant, after.daemonLog ?? '');
  const files = after.markers.split('\n');
  const pids = pairs(before.pids);
  const states = pairs(after.units);
  const ended: EndedProject[] = [];
  for (const p of SCENARIO.projects) {
    const marker = files.includes(`${p.name}.graceful`);
    const how = howEnded(states[p.name] ?? '', marker);
    if (how === null) continue;
    const pid = Number(pids[p.name]);
    ended.push({
      name: p.name,
      priority: p.priority,
      how,
      marker,
      by: whoEnded(variant, p.name, Number.isFinite(pid) ? pid : undefined, kills, actions),
    });
  }
  const daemon: Record<string, string> | undefined = unit
    ? {
        ...Object.fromEntries(Object.keys(DAEMON_CONFIG[variant]).map((k) => [k, before[k]])),
        activeAfter: after.daemonState,
        log: after.daemonLog,
      }
    : undefined;
  return {
    variant,
    run,
    ...readOff(before, after, kills, ended, watch, answered),
    daemonActions: actions,
    daemon,
    phasesMs,
    note: watch.reached
      ? undefined
      : `the balloon stayed at ${Math.round(watch.actual / MiB)} MiB for ${Math.round(o.squeezeBoundMs / 1000)} s`,
  };
}

export interface NestctlResult {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** The real host broker (dist/agent/cli/nestbroker.js host) for the booted guest. */
export class HostBroker {
  private constructor(
    readonly child: ChildProcess,
    readonly socket: string,
    readonly dir: string,
  ) {}

  /**
   * Writes dir/host.yaml (state in dir/host-state), starts it, waits for its socket.
   * `vm` is the plain QEMU guest (scenario's hostYaml), or a function writing the file's
   * text for the state directory and socket (the libvirt test). The log is appended to.
   */
  static async start(
    vm: Vm | ((stateDir: string, socket: string) => string),
    dir: string,
    socket: string,
    timeoutMs = 60_000,
  ) {
    const stateDir = path.join(dir, 'host-state');
    await fsp.mkdir(stateDir, { recursive: true });
    const cfg = path.join(dir, 'host.yaml');
    await fsp.writeFile(
      cfg,
      typeof vm === 'function' ? vm(stateDir, socket) : hostYaml(vm, stateDir, socket),
    );
    const log = createWriteStream(path.join(dir, 'host-broker.log'), { flags: 'a' });
    const child = spawn(
      process.execPath,
      [path.join(REPO, 'dist/agent/cli/nestbroker.js'), 'host', '--config', cfg],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    child.stdout?.pipe(log);
    child.stderr?.pipe(log);
    const b = new HostBroker(child, socket, dir);
    const until = Date.now() + timeoutMs;
    while (!existsSync(socket) && Date.now() < until && child.exitCode === null) await sleep(100);
    if (!existsSync(socket)) {
      await b.stop();
      throw new Error(`the host broker did not listen on ${socket} (see ${dir}/host-broker.log)`);
    }
    return b;
  }

  nestctl(args: string[], timeoutMs = 180_000): Promise<NestctlResult> {
    const t0 = Date.now();
    return withTimeout(
      `nestctl ${args.join(' ')}`,
      timeoutMs,
      new Promise<NestctlResult>((resolve) => {
        execFile(
          process.execPath,
          [path.join(REPO, 'dist/agent/cli/nestctl.js'), '--socket', this.socket, ...args],
          { maxBuffer: 16 * MiB },
          (err, stdout, stderr) =>
            resolve({
              code: err ? ((err as { code?: number }).code ?? -1) : 0,
              stdout,
              stderr,
              ms: Date.now() - t0,
            }),
        );
      }),
    );
  }

  /** Polls `nestctl guests` until the guest's agent said hello; returns the last answer. */
  async waitConnected(timeoutMs = 60_000, ok = /"connected": true/): Promise<NestctlResult> {
    const until = Date.now() + timeoutMs;
    let g = await this.nestctl(['guests', '--json']);
    while (!ok.test(g.stdout) && Date.now() < until) {
      await sleep(300);
      g = await this.nestctl(['guests', '--json']);
    }
    return g;
  }

  /** SIGTERM to our own child, by its pid; SIGKILL if it does not go within 10 s. */
  async stop(): Promise<void> {
    const c = this.child;
    if (c.pid && c.exitCode === null && c.signalCode === null) {
      const gone = new Promise((r) => c.once('exit', r));
      c.kill('SIGTERM');
      await withTimeout('host broker exit', 10_000, gone).catch(() => c.kill('SIGKILL'));
    }
  }
}

/** The parts of the host's notice view this file reads (agent/host/api.ts noticeView). */
interface NoticeSeen {
  state?: string;
  issuedAt?: string;
  outcomeAt?: string;
  actuatedAt?: string;
  outcome?: {
    projects?: { name: string; action: string; exit?: string | null; ms?: number }[];
  };
  actuation?: { balloon?: { reached?: boolean; actualBytes?: number; ms?: number } };
}

/**
 * (b) nestbroker: the agent (installed from the .deb, configured by
 * writeGuestConfig) starts fresh projects from a fresh state, a fresh host broker
 * connects, and `reclaim` takes the same 320 MiB: the notice, the agent's plan and
 * graceful stop, the outcome, then the broker's balloon. The guest agent must be
 * installed and configured already.
 */
export async function runNestbroker(
  vm: Vm,
  run: number,
  o: RunOptions & { outDir: string },
): Promise<VariantRun> {
  const say = o.log ?? (() => undefined);
  const { phasesMs, lap } = phaseClock();
  await cleanSlate(vm);
  lap('cleanSlate');
  // A fresh agent: its journal and the markers gone, so every project starts anew.
  await vm.sh(`rm -rf /var/lib/nestbroker/guest ${SCENARIO.markers}`);
  await vm.sh('systemctl start nestbroker-guest.service', 120_000);
  const up = await waitStarted(vm, SCENARIO.markers);
  if (up.code !== 0) throw new Error(`nestbroker run ${run}: the projects did not start`);
  const dir = path.join(o.outDir, `nestbroker-run${run}`);
  await fsp.rm(dir, { recursive: true, force: true });
  const broker = await HostBroker.start(vm, dir, path.join(vm.runDir, `hb${run}.sock`));
  try {
    const g = await broker.waitConnected();
    if (!/"connected": true/.test(g.stdout))
      throw new Error(`nestbroker run ${run}: the agent did not connect: ${g.stdout}${g.stderr}`);
    lap('setup');
    const token = `graceful-vs-oom nestbroker run ${run} ${Date.now()}`;
    const before = await sections(vm, {
      meminfo: 'cat /proc/meminfo',
      vmstat: 'grep -w oom_kill /proc/vmstat',
      memory: PROJECT_NAMES.map(
        (p) => `echo "${p} $(cat ${AGENT_CG}/projects/${p}/memory.current)"`,
      ).join('; '),
      pids: PROJECT_NAMES.map(
        (p) => `echo "${p} $(cut -d' ' -f1 ${SCENARIO.markers}/${p}.started)"`,
      ).join('; '),
      kmsg: `echo '${token}' >/dev/kmsg`,
    });
    lap('before');
    say(`nestbroker run ${run}: reclaim ${SCENARIO.vmMemoryMiB - SCENARIO.squeezedMiB} MiB`);
    const t0 = Date.now();
    let settledAt = 0;
    const watching = squeeze(vm, o, t0, () => settledAt > 0 && Date.now() - settledAt > 5000);
    let view: NoticeSeen = {};
    let error: string | undefined;
    try {
      view = (await rpcCall(
        broker.socket,
        'reclaim',
        {
          guest: 'vm1',
          memory: `${SCENARIO.vmMemoryMiB - SCENARIO.squeezedMiB}MiB`,
          deadline: '90s',
          reason: 'bench graceful-vs-oom (real guest)',
        },
        { timeoutMs: 150_000 },
      )) as NoticeSeen;
    } catch (e) {
      error = String(e);
    } finally {
      settledAt = Date.now();
    }
    const { watch, answered } = await watching;
    lap('squeeze');
    await broker.stop();
    await balloonTo(vm, SCENARIO.vmMemoryMiB * MiB, 60_000);
    const after = await sections(
      vm,
      {
        vmstat: 'grep -w oom_kill /proc/vmstat',
        dmesg: `dmesg | sed -n '/${token}/,$p'`,
        markers: `ls ${SCENARIO.markers}`,
        memoryEvents: PROJECT_NAMES.map(
          (p) => `echo "${p} $(grep oom_kill ${AGENT_CG}/projects/${p}/memory.events)"`,
        ).join('; '),
        procs: PROJECT_NAMES.map(
          (p) => `echo "${p} $(cat ${AGENT_CG}/projects/${p}/cgroup.procs 2>/dev/null | wc -l)"`,
        ).join('; '),
      },
      180_000,
    );
    lap('collect');
    const kills = parseOomKills(after.dmesg);
    const files = after.markers.split('\n');
    const pids = pairs(before.pids);
    const procs = pairs(after.procs);
    const ended: EndedProject[] = [];
    for (const p of SCENARIO.projects) {
      const marker = files.includes(`${p.name}.graceful`);
      const stopped = view.outcome?.projects?.find(
        (x) => x.name === p.name && x.action === 'stopped',
      );
      const killed = kills.some((k) => k.pid === Number(pids[p.name]));
      if (stopped)
        ended.push({
          name: p.name,
          priority: p.priority,
          how:
            stopped.exit === 'graceful' && marker
              ? 'graceful'
              : stopped.exit === 'killed'
                ? 'SIGKILL'
                : String(stopped.exit),
          marker,
          by: 'nestbroker',
        });
      else if (killed || procs[p.name] === '0')
        ended.push({
          name: p.name,
          priority: p.priority,
          how: killed ? 'SIGKILL' : 'gone',
          marker,
          by: killed ? 'kernel OOM killer' : 'unknown',
        });
    }
    const balloon = view.actuation?.balloon;
    return {
      variant: 'nestbroker',
      run,
      ...readOff(before, after, kills, ended, watch, answered),
      daemonActions: [],
      notice: {
        state: view.state,
        error,
        issuedAt: view.issuedAt,
        outcomeAt: view.outcomeAt,
        actuatedAt: view.actuatedAt,
        projects: view.outcome?.projects?.map((x) => ({
          name: x.name,
          action: x.action,
          exit: x.exit,
          ms: x.ms,
        })),
        brokerBalloon: balloon,
        projectOomKillEvents: after.memoryEvents.split('\n'),
      },
      phasesMs,
      note:
        error ??
        (view.state !== 'done' ? `notice ${view.state}` : undefined) ??
        (watch.reached ? undefined : 'the balloon did not reach its target'),
    };
  } finally {
    await broker.stop();
  }
}

/**
 * A real-guest test's figures: `results` is written to OUT/results.json after every phase,
 * so a run that fails half-way still leaves what it measured; `phase(name, fn)` runs `fn`
 * and records how long it took under `results.phasesMs[name]`.
 */
export function resultsBook(outDir: string, first: Record<string, unknown>) {
  const results: Record<string, unknown> = { ...first };
  const phases: Record<string, number> = {};
  results.phasesMs = phases;
  const saveResults = async (): Promise<void> => {
    await fsp.mkdir(outDir, { recursive: true });
    await fsp.writeFile(path.join(outDir, 'results.json'), JSON.stringify(results, null, 2) + '\n');
  };
  const phase = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    const t0 = Date.now();
    try {
      return await fn();
    } finally {
      phases[name] = Date.now() - t0;
      await saveResults();
    }
  };
  return { results, phases, saveResults, phase };
}
