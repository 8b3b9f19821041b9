/**
 * Load held (docs/reliability.md): a soak of the whole stack as real processes. One host
 * broker and N guest agents (each "VM" a cgroup under this run's root, one small project
 * each, a real process holding a few MiB and burning 1 % of a CPU); notices at a fixed rate
 * spread evenly over the guests, each guest alternating a CPU-only reclaim (0.5 CPU: the
 * project's cpu.max shrinks, it keeps running) and the restore that gives it back.
 *
 *   make build && node dist/bench/soak.js [--guests 20] [--rate 1000] [--minutes 10]
 *                                          [--out bench/results/soak.json]
 *
 * Checked at the end, from both daemons' operator APIs and journals: every notice
 * answered (`done`, outcome `complete`), none lost (each issued id is in the host's and
 * the guest's journal) and none doubled (each id once, carried out in one run), and each
 * project still the same process it was at the start. RSS of the host and of every guest
 * agent is sampled each `--sample` (default a minute) and the slope reported (MiB/min,
 * least squares over the samples after the first). test/load/soak.test.ts runs a short
 * version of this in `make test`.
 */
import { promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { rpcCall } from '../agent/common/rpc';
import type { NoticeView } from '../agent/host/api';
import { Stack, type GuestSpec } from '../demo/stack';

export interface SoakOptions {
  guests: number;
  /** Notices a minute, over all guests. */
  ratePerMinute: number;
  durationMs: number;
  sampleEveryMs: number;
  /** cgroup root (tests: `nestbroker-test-<pid>-…`). */
  root: string;
  /** Where configs, journals and logs go (removed afterwards unless keepDir). */
  dir?: string;
  keepDir?: boolean;
  progress?: (line: string) => void;
}

export interface RssSample {
  atS: number;
  hostMiB: number;
  guestsMiB: number[];
}

export interface SoakReport {
  guests: number;
  ratePerMinute: number;
  durationS: number;
  issued: number;
  answered: number;
  done: number;
  /** Notices the host journal holds as done (all of them, from disk). */
  hostJournalDone: number;
  complete: number;
  lost: number;
  doubled: number;
  errors: { code: string; count: number }[];
  /** Notices whose rpc started more than one period after it was due (the driver fell behind). */
  behind: number;
  latencyMs: { p50: number; p99: number; max: number };
  projectsRestarted: number;
  rss: {
    samples: RssSample[];
    hostSlopeMiBPerMin: number;
    guestSlopeMiBPerMin: { mean: number; max: number };
    /**
     * The same over the second half of the run: the daemons keep the last 256 finished
     * notices per guest in memory, so their memory fills for the first 256 notices of each
     * guest and is flat after; the second half is the steady state.
     */
    secondHalf: { hostSlopeMiBPerMin: number; guestSlopeMiBPerMin: { mean: number; max: number } };
    hostFirstLastMiB: [number, number];
    guestMeanFirstLastMiB: [number, number];
  };
  machine: { cpus: number; memGiB: number; node: string; loadavg: number[] };
}

const MiB = 1024 * 1024;

function rssMiB(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Math.round(Number(m[1]) / 102.4) / 10 : NaN;
  } catch {
    return NaN;
  }
}

/** Least-squares slope of y over x. */
export function slope(xs: number[], ys: number[]): number {
  const n = xs.length;
  if (n < 2) return 0;
  const mx = xs.reduce((a, b) => a + b, 0) / n;
  const my = ys.reduce((a, b) => a + b, 0) / n;
  let num = 0;
  let den = 0;
  for (let i = 0; i < n; i++) {
    num += (xs[i] - mx) * (ys[i] - my);
    den += (xs[i] - mx) ** 2;
  }
  return den === 0 ? 0 : num / den;
}

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

function guestSpecs(n: number): GuestSpec[] {
  return Array.from({ length: n }, (_, i) => ({
    name: `g${String(i + 1).padStart(2, '0')}`,
    priority: i + 1,
    memory: '256MiB',
    cpus: 2,
    floor: { memory: '64MiB', cpus: 0.2 },
    projects: [
      {
        name: 'app',
        priority: 10,
        memoryMin: '16MiB',
        memoryMax: '128MiB',
        cpuMin: 0.1,
        cpuMax: 2,
        holdMiB: 4,
        burn: 0.01,
        gracePeriod: '2s',
      },
    ],
  }));
}

interface Issued {
  guest: string;
  kind: 'reclaim' | 'restore';
  id?: string;
  state?: string;
  status?: string;
  ms: number;
  error?: string;
}

export async function runSoak(o: SoakOptions): Promise<SoakReport> {
  const say = o.progress ?? (() => undefined);
  const dir = o.dir ?? (await fs.mkdtemp(path.join(os.tmpdir(), 'nb-soak-')));
  // One line a notice per process at info is a lot of disk over ten minutes: warnings only.
  process.env.NESTBROKER_LOG_LEVEL = process.env.NESTBROKER_LOG_LEVEL ?? 'warn';
  const stack = new Stack({
    root: o.root,
    dir,
    guests: guestSpecs(o.guests),
    transport: 'unix',
    // A 2-core machine running 20 agents and 20 projects: a slow pong is not a dead guest.
    heartbeat: { interval: '2s', timeout: '10s' },
  });
  try {
    await stack.createVms();
    await stack.writeConfigs();
    // Four at a time: twenty node processes starting at once on two cores time out.
    for (let i = 0; i < stack.guests.length; i += 4)
      await Promise.all(stack.guests.slice(i, i + 4).map((g) => stack.startGuest(g.spec.name)));
    await stack.startHost();
    await stack.waitConnected();
    // Each project's process, to show none was restarted.
    const procsOf = async (g: string): Promise<string> =>
      fs
        .readFile(
          path.join('/sys/fs/cgroup/unified', o.root, g, 'projects/app/cgroup.procs'),
          'utf8',
        )
        .catch(() => '');
    const initialProcs = new Map<string, string>();
    for (const g of stack.guests) {
      for (let i = 0; i < 100 && !(await procsOf(g.spec.name)).trim(); i++) await sleep(100);
      initialProcs.set(g.spec.name, (await procsOf(g.spec.name)).trim());
    }
    say(`stack up: ${o.guests} guests, host pid ${stack.host!.child.pid}`);

    const samples: RssSample[] = [];
    const t0 = Date.now();
    const sample = (): void => {
      samples.push({
        atS: Math.round((Date.now() - t0) / 100) / 10,
        hostMiB: rssMiB(stack.host?.child.pid),
        guestsMiB: stack.guests.map((g) => rssMiB(g.proc?.child.pid)),
      });
      const last = samples[samples.length - 1];
      const mean = last.guestsMiB.reduce((a, b) => a + b, 0) / last.guestsMiB.length;
      say(
        `t=${last.atS}s host RSS ${last.hostMiB} MiB, guest agents mean ${mean.toFixed(1)} MiB; ${issued.length} notices issued`,
      );
    };
    const issued: Issued[] = [];
    let behind = 0;
    sample();
    const sampler = setInterval(sample, o.sampleEveryMs);

    // Each guest gets a notice every `period`, guests staggered evenly over one period.
    const period = (o.guests * 60_000) / o.ratePerMinute;
    const perGuest = Math.floor(o.durationMs / period);
    await Promise.all(
      stack.guests.map(async (g, gi) => {
        const name = g.spec.name;
        for (let k = 0; k < perGuest; k++) {
          const due = t0 + (gi * period) / o.guests + k * period;
          const wait = due - Date.now();
          if (wait > 0) await sleep(wait);
          else if (-wait > period) behind++;
          const kind = k % 2 === 0 ? 'reclaim' : 'restore';
          const rec: Issued = { guest: name, kind, ms: 0 };
          issued.push(rec);
          const s0 = Date.now();
          try {
            const n = (await rpcCall(
              stack.hostSocket,
              kind,
              kind === 'reclaim'
                ? { guest: name, cpus: 0.5, deadline: '30s', reason: 'soak' }
                : { guest: name, deadline: '30s', reason: 'soak' },
              { timeoutMs: 60_000 },
            )) as NoticeView;
            rec.id = n.id;
            rec.state = n.state;
            rec.status = n.outcome?.status;
          } catch (err) {
            rec.error = (err as { code?: string }).code ?? String(err);
          }
          rec.ms = Date.now() - s0;
        }
      }),
    );
    clearInterval(sampler);
    sample();
    const durationS = (Date.now() - t0) / 1000;

    // Lost and doubled, from both sides' journals on disk: the durable record (the daemons
    // keep only the last notices in memory, and an operator listing of ten thousand would
    // not fit one RPC line).
    const readJournal = async <T>(d: string): Promise<T[]> => {
      const out: T[] = [];
      for (const f of await fs.readdir(d).catch(() => [] as string[]))
        if (f.endsWith('.json'))
          out.push(JSON.parse(await fs.readFile(path.join(d, f), 'utf8')) as T);
      return out;
    };
    const hostAll = await readJournal<{ notice: { id: string }; state: string }>(
      path.join(dir, 'host-state', 'notices'),
    );
    const hostCount = new Map<string, number>();
    for (const n of hostAll) hostCount.set(n.notice.id, (hostCount.get(n.notice.id) ?? 0) + 1);
    let lost = 0;
    let doubled = 0;
    const guestIds = new Map<string, { count: number; runs: number; state: string }>();
    for (const g of stack.guests) {
      const rows = await readJournal<{ notice: { id: string }; runs: number; state: string }>(
        path.join(dir, g.spec.name, 'state', 'notices'),
      );
      for (const r of rows) {
        const e = guestIds.get(r.notice.id);
        guestIds.set(r.notice.id, { count: (e?.count ?? 0) + 1, runs: r.runs, state: r.state });
      }
      // And the operator's view agrees with the journal for the most recent ones.
      const recent = (await rpcCall(g.socket, 'notices', {}, { timeoutMs: 60_000 })) as {
        id: string;
        state: string;
      }[];
      for (const r of recent) if (guestIds.get(r.id)?.state !== r.state) lost++;
    }
    for (const rec of issued) {
      if (!rec.id) {
        lost++;
        continue;
      }
      const h = hostCount.get(rec.id) ?? 0;
      const g = guestIds.get(rec.id);
      if (h === 0 || !g || g.state !== 'done') lost++;
      if (h > 1 || (g && (g.count > 1 || g.runs > 1))) doubled++;
    }
    // Notices neither side should have: more journaled than issued.
    const extra = hostAll.length - issued.filter((r) => r.id).length;
    if (extra > 0) doubled += extra;
    const hostDone = hostAll.filter((n) => n.state === 'done').length;

    let projectsRestarted = 0;
    for (const g of stack.guests)
      if ((await procsOf(g.spec.name)).trim() !== initialProcs.get(g.spec.name))
        projectsRestarted++;

    const errs = new Map<string, number>();
    for (const r of issued) if (r.error) errs.set(r.error, (errs.get(r.error) ?? 0) + 1);
    const lat = issued
      .filter((r) => !r.error)
      .map((r) => r.ms)
      .sort((a, b) => a - b);
    // Slopes after the first sample (start-up: JIT, first journal files, pools warming).
    const steady = samples.slice(1);
    const xs = steady.map((s) => s.atS / 60);
    const hostSlope = slope(
      xs,
      steady.map((s) => s.hostMiB),
    );
    const guestSlopes = stack.guests.map((_, i) =>
      slope(
        xs,
        steady.map((s) => s.guestsMiB[i]),
      ),
    );
    const meanOf = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
    const half = samples.filter((x) => x.atS >= durationS / 2);
    const hx = half.map((x) => x.atS / 60);
    const halfGuest = stack.guests.map((_, i) =>
      slope(
        hx,
        half.map((x) => x.guestsMiB[i]),
      ),
    );
    const r1 = (v: number) => Math.round(v * 10) / 10;
    const r2 = (v: number) => Math.round(v * 100) / 100;
    return {
      guests: o.guests,
      ratePerMinute: o.ratePerMinute,
      durationS: r1(durationS),
      issued: issued.length,
      answered: issued.filter((r) => !r.error).length,
      done: issued.filter((r) => r.state === 'done').length,
      hostJournalDone: hostDone,
      complete: issued.filter((r) => r.status === 'complete').length,
      lost,
      doubled,
      errors: [...errs].map(([code, count]) => ({ code, count })),
      behind,
      latencyMs: {
        p50: quantile(lat, 0.5),
        p99: quantile(lat, 0.99),
        max: lat[lat.length - 1] ?? 0,
      },
      projectsRestarted,
      rss: {
        samples,
        hostSlopeMiBPerMin: r2(hostSlope),
        guestSlopeMiBPerMin: { mean: r2(meanOf(guestSlopes)), max: r2(Math.max(...guestSlopes)) },
        secondHalf: {
          hostSlopeMiBPerMin: r2(
            slope(
              hx,
              half.map((x) => x.hostMiB),
            ),
          ),
          guestSlopeMiBPerMin: { mean: r2(meanOf(halfGuest)), max: r2(Math.max(...halfGuest)) },
        },
        hostFirstLastMiB: [samples[0].hostMiB, samples[samples.length - 1].hostMiB],
        guestMeanFirstLastMiB: [
          r1(meanOf(samples[0].guestsMiB)),
          r1(meanOf(samples[samples.length - 1].guestsMiB)),
        ],
      },
      machine: {
        cpus: os.cpus().length,
        memGiB: Math.round(os.totalmem() / 1024 / MiB),
        node: process.version,
        loadavg: os.loadavg().map(r2),
      },
    };
  } finally {
    await stack.teardown().catch(() => undefined);
    if (!o.keepDir) await fs.rm(dir, { recursive: true, force: true });
  }
}

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1] : dflt;
}

async function main(): Promise<void> {
  const guests = Number(arg('guests', '20'));
  const rate = Number(arg('rate', '1000'));
  const minutes = Number(arg('minutes', '10'));
  const sample = Number(arg('sample', '60'));
  const out = arg('out', path.resolve(__dirname, '..', '..', 'bench', 'results', 'soak.json'));
  const root = `nestbroker-test-${process.pid}-soak`;
  const stamp = (): string => new Date().toISOString().slice(11, 19);
  // Interrupted: the stack's processes and cgroups still go (teardown in runSoak's finally).
  const report = await runSoak({
    guests,
    ratePerMinute: rate,
    durationMs: minutes * 60_000,
    sampleEveryMs: sample * 1000,
    root,
    progress: (l) => console.log(`[${stamp()}] ${l}`),
  });
  const { samples, ...rss } = report.rss;
  console.log(JSON.stringify({ ...report, rss: { ...rss, samples: samples.length } }, null, 2));
  await fs.mkdir(path.dirname(out), { recursive: true });
  await fs.writeFile(
    out,
    JSON.stringify({ at: new Date().toISOString(), ...report }, null, 2) + '\n',
  );
  console.log(`written ${out}`);
  const ok = report.lost === 0 && report.doubled === 0 && report.answered === report.issued;
  process.exit(ok ? 0 : 1);
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}
