/**
 * Usage of the host as a whole (systeminformation) and of single processes (pidusage).
 * Per-group usage comes from the cgroup files (CgroupAdapter.usage).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import { CgroupError } from './errors';

// Both libraries are loaded on first use, not at start: systeminformation only where Linux
// has no /proc (the fallbacks below) and pidusage only for processUsage and processRows. Loaded up front
// they were ~10 MiB of the host broker's idle RSS (docs/performance.md, "Footprint: what
// each step saved").
type Si = typeof import('systeminformation');
type PidUsage = typeof import('pidusage');
// eslint-disable-next-line @typescript-eslint/no-require-imports
const si = (): Si => require('systeminformation') as Si;
// eslint-disable-next-line @typescript-eslint/no-require-imports
const pidusage = (): PidUsage => require('pidusage') as PidUsage;

export interface HostUsage {
  memTotal: number;
  /** MemAvailable: what can be used without swapping (proc(5)). */
  memAvailable: number;
  cpuCount: number;
  /** 1, 5 and 15 minute load averages. */
  load: [number, number, number];
  /** Current CPU busy share of the whole host, 0..100 (since the previous call). */
  currentLoadPct: number;
}

/** The previous /proc/stat `cpu` totals, for the busy share since the last call. */
let lastCpu: { busy: number; total: number } | undefined;

/**
 * Cheap by design (docs/performance.md: the host broker calls this every trigger interval;
 * through systeminformation each call spawned a process and read dozens of files, a CPU
 * spike every tick): /proc/meminfo and /proc/stat, one read each (proc(5)), where Linux has
 * them; systeminformation elsewhere.
 */
export async function hostUsage(): Promise<HostUsage> {
  const [l1, l5, l15] = os.loadavg();
  let meminfo: string;
  let stat: string;
  try {
    meminfo = fs.readFileSync('/proc/meminfo', 'utf8');
    stat = fs.readFileSync('/proc/stat', 'utf8');
  } catch {
    const [mem, cpu, load] = await Promise.all([si().mem(), si().cpu(), si().currentLoad()]);
    return {
      memTotal: mem.total,
      memAvailable: mem.available,
      cpuCount: cpu.cores,
      load: [l1, l5, l15],
      currentLoadPct: load.currentLoad,
    };
  }
  const kb = (key: string): number | undefined => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB$`, 'm').exec(meminfo);
    return m ? Number(m[1]) * 1024 : undefined;
  };
  // cpu  user nice system idle iowait irq softirq steal ...: idle + iowait are not busy.
  const f = (/^cpu\s+(.*)$/m.exec(stat)?.[1] ?? '').trim().split(/\s+/).map(Number);
  const total = f.slice(0, 8).reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
  const busy = total - (f[3] ?? 0) - (f[4] ?? 0);
  const prev = lastCpu;
  lastCpu = { busy, total };
  const dt = prev ? total - prev.total : 0;
  const memTotal = os.totalmem();
  return {
    memTotal,
    memAvailable: Math.min(memTotal, kb('MemAvailable') ?? os.freemem()),
    cpuCount: os.cpus().length,
    load: [l1, l5, l15],
    currentLoadPct: dt > 0 ? Math.round(((busy - prev!.busy) / dt) * 10000) / 100 : 0,
  };
}

export interface ProcessUsage {
  pid: number;
  /** CPU share since the previous sample of this pid (100 = one full CPU). */
  cpuPct: number;
  rssBytes: number;
  elapsedMs: number;
}

/** One process's usage; code ESRCH when it is gone. */
export async function processUsage(pid: number): Promise<ProcessUsage> {
  try {
    const s = await pidusage()(pid);
    return { pid, cpuPct: s.cpu, rssBytes: s.memory, elapsedMs: s.elapsed };
  } catch (e) {
    const gone = !fs.existsSync(`/proc/${pid}`);
    throw new CgroupError(gone ? 'ESRCH' : 'READ_FAILED', `usage of process ${pid}: ${String(e)}`, {
      field: 'pid',
      value: pid,
      cause: e,
    });
  }
}

/** Drops pidusage's per-pid history (call when done sampling). */
export function clearProcessUsage(): void {
  pidusage().clear();
}

/** What the machine is (`nestctl status`): static facts, read once through systeminformation. */
export interface HostInventory {
  hostname: string;
  /** e.g. "Intel Xeon® Processor", as systeminformation names it (manufacturer + brand). */
  cpuModel: string;
  /** Logical CPUs (threads) and physical cores. */
  cpus: number;
  physicalCores: number;
  /** Base clock in GHz (0 where the kernel does not say). */
  cpuGHz: number;
  memTotalBytes: number;
  /** e.g. "Debian GNU/Linux 12", and the kernel release. */
  os: string;
  kernel: string;
  arch: string;
}

let inventory: Promise<HostInventory> | undefined;

/**
 * The inventory from /proc/cpuinfo, /etc/os-release and the os module (proc(5),
 * os-release(5)), as systeminformation reads it on Linux but without loading it:
 * systeminformation resident in a host broker after its first `status` was 23 modules and
 * several MiB (docs/performance.md, "Footprint: what each step saved"). Undefined where
 * /proc/cpuinfo has no CPU lines (then systeminformation, below).
 */
export function linuxInventory(
  cpuinfo: string,
  osRelease: string,
  freqKHz: number | undefined,
): HostInventory | undefined {
  const field = (block: string, key: string): string | undefined =>
    new RegExp(`^${key}\\s*:\\s*(.*)$`, 'm').exec(block)?.[1]?.trim();
  const blocks = cpuinfo.split(/\n\s*\n/).filter((b) => /^processor\s*:/m.test(b));
  if (blocks.length === 0) return undefined;
  const name = field(blocks[0], 'model name') ?? '';
  const vendor = field(blocks[0], 'vendor_id') ?? '';
  const maker = /AMD/i.test(vendor) ? 'AMD' : /Intel/i.test(vendor) ? 'Intel' : '';
  let model = name
    .replace(/\(R\)/gi, '®')
    .replace(/\(TM\)/gi, '™')
    .replace(/\s+CPU\b/g, '')
    .replace(/\s*@\s*[\d.]+\s*GHz/i, '')
    .replace(/\s+/g, ' ')
    .trim();
  // systeminformation names the maker plainly and keeps the rest as the CPU says it:
  // "Intel(R) Xeon(R) Processor" is "Intel Xeon® Processor" (its cpuBrandManufacturer).
  const words = model.split(' ');
  if (maker && words[0].replace(/[®™©]/g, '').toLowerCase() === maker.toLowerCase())
    words[0] = maker;
  else if (maker) words.unshift(maker);
  model = words.join(' ');
  const cores = new Set(
    blocks.map(
      (b) => `${field(b, 'physical id') ?? '0'}/${field(b, 'core id') ?? field(b, 'processor')}`,
    ),
  );
  const ghzInName = /@\s*([\d.]+)\s*GHz/i.exec(name)?.[1];
  const ghz = freqKHz ? freqKHz / 1e6 : ghzInName ? Number(ghzInName) : 0;
  const rel = (key: string): string | undefined => {
    const v = new RegExp(`^${key}=(.*)$`, 'm').exec(osRelease)?.[1]?.trim();
    return v?.replace(/^"(.*)"$/, '$1');
  };
  return {
    hostname: os.hostname(),
    cpuModel: model,
    cpus: blocks.length,
    physicalCores: cores.size || blocks.length,
    cpuGHz: Math.round(ghz * 100) / 100,
    memTotalBytes: os.totalmem(),
    os: [rel('NAME'), rel('VERSION_ID')].filter(Boolean).join(' '),
    kernel: os.release(),
    arch: os.arch(),
  };
}

function readOr(file: string, dflt: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return dflt;
  }
}

/**
 * The machine's CPU model, cores, memory and OS, once per process and cached, never on a
 * tick: from /proc and /etc/os-release on Linux (linuxInventory), elsewhere through
 * systeminformation's cpu(), mem(), osInfo() (about 0.1–0.3 s of reads and a few
 * commands). A failed read is not cached.
 */
export function hostInventory(): Promise<HostInventory> {
  inventory ??= (async () => {
    const freq = Number(
      readOr('/sys/devices/system/cpu/cpu0/cpufreq/base_frequency', '') ||
        readOr('/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq', ''),
    );
    const linux = linuxInventory(
      readOr('/proc/cpuinfo', ''),
      readOr('/etc/os-release', readOr('/usr/lib/os-release', '')),
      Number.isFinite(freq) && freq > 0 ? freq : undefined,
    );
    if (linux) return linux;
    const [cpu, mem, osi] = await Promise.all([si().cpu(), si().mem(), si().osInfo()]);
    return {
      hostname: osi.hostname || os.hostname(),
      cpuModel: [cpu.manufacturer, cpu.brand].filter(Boolean).join(' ').trim(),
      cpus: cpu.cores || os.cpus().length,
      physicalCores: cpu.physicalCores || cpu.cores,
      cpuGHz: cpu.speed || 0,
      memTotalBytes: mem.total || os.totalmem(),
      os: [osi.distro, osi.release].filter(Boolean).join(' '),
      kernel: osi.kernel || os.release(),
      arch: osi.arch || os.arch(),
    };
  })();
  const p = inventory;
  p.catch(() => {
    if (inventory === p) inventory = undefined;
  });
  return p;
}

/** One process in a per-process view: who it is and what it uses (pidusage). */
export interface ProcessRow extends ProcessUsage {
  /** /proc/<pid>/comm: the program's name (15 characters at most, proc(5)). */
  comm: string;
  /** The command line, arguments joined by spaces, cut to 200 characters. */
  cmdline: string;
}

/**
 * Usage of these processes now, largest RSS first, through pidusage: one call for all of
 * them (it reads /proc/<pid>/stat for each; its CPU share is since that pid's previous
 * sample in this process, or since the process started on the first). A pid gone in
 * between is left out. For views asked for on demand (`nestctl status --processes`,
 * `nestctl --guest top --processes`), never a periodic sampler. pidusage forgets a pid
 * it has not been asked about for a minute (its history's maxage).
 */
export async function processRows(pids: readonly number[]): Promise<ProcessRow[]> {
  const unique = [...new Set(pids)].filter((p) => Number.isSafeInteger(p) && p > 0);
  if (unique.length === 0) return [];
  const rows: ProcessRow[] = [];
  // pidusage rejects the whole batch when one pid is gone: ask each on its own.
  await Promise.all(
    unique.map(async (pid) => {
      try {
        const s = await pidusage()(pid);
        const read = (f: string): string => {
          try {
            return fs.readFileSync(`/proc/${pid}/${f}`, 'utf8');
          } catch {
            return '';
          }
        };
        rows.push({
          pid,
          cpuPct: Math.round(s.cpu * 100) / 100,
          rssBytes: s.memory,
          elapsedMs: s.elapsed,
          comm: read('comm').trim(),
          cmdline: read('cmdline').split('\0').filter(Boolean).join(' ').slice(0, 200),
        });
      } catch {
        // Gone between the listing and the read: not a row.
      }
    }),
  );
  return rows.sort((a, b) => b.rssBytes - a.rssBytes || a.pid - b.pid);
}
