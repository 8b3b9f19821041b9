/**
 * One QEMU guest for the real-guest test: boot, run commands inside, QMP, and a
 * clean end. Measured recipe: docs/install.md.
 *
 * - The guest image comes from build-image.sh (cached); each boot writes to its own qcow2
 *   overlay, so the cached image stays pristine and runs never see each other's state.
 * - Two virtio-serial ports: org.nestbroker.0 (the nestbroker channel, left to the host
 *   broker: this module never connects to it) and org.nestbroker.test (the test-only
 *   command runner, guest/runner.js).
 * - Two QMP sockets: qmp.sock for the host broker, qmp-test.sock for the test (a QMP
 *   server takes one client at a time).
 * - QEMU is ended by the pid this module started, never by name; every wait is bounded.
 * - The serial console goes to OUT/console.log, and everything else this module learns
 *   (commands run, QMP traffic) to OUT/, so a failing CI run shows it.
 */
import { spawn, type ChildProcess } from 'child_process';
import {
  promises as fsp,
  existsSync,
  constants as fsConstants,
  accessSync,
  createWriteStream,
  readFileSync,
} from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';

export interface VmOptions {
  /** Directory printed by build-image.sh: vmlinuz, initrd.img, rootfs.ext4. */
  imageDir: string;
  /** Where logs are kept (created; not removed). */
  outDir: string;
  /** Host directory shared read-only at /mnt/code in the guest (9p tag "code"). */
  shareDir: string;
  memoryMiB?: number;
  cpus?: number;
  /** Boot until the runner answers. TCG on 2 cores: ~15–25 s measured. */
  bootTimeoutMs?: number;
}

export interface RunResult {
  code: number | null;
  signal: string | null;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  ms: number;
}

type Json = Record<string, unknown>;

/**
 * KVM proper needs the CPU's virtualisation extensions (vmx or svm in /proc/cpuinfo's
 * flags, Documentation/virt/kvm/api.rst). A /dev/kvm without them (a kernel with PVM, the
 * pagetable-based KVM, as on some build machines) runs only guests whose kernel was built
 * for it: Debian's guest kernel hangs there without a line on the console. So: TCG.
 */
export function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', fsConstants.R_OK | fsConstants.W_OK);
  } catch {
    return false;
  }
  const flags = /^flags\s*:(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? '';
  return /\b(vmx|svm)\b/.test(flags);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Rejects after `ms` with a message naming what was waited for. */
export async function withTimeout<T>(what: string, ms: number, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([p, t]);
  } finally {
    clearTimeout(timer);
  }
}

async function connectWhenReady(sock: string, timeoutMs: number): Promise<net.Socket> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const s = net.createConnection(sock);
        s.once('connect', () => resolve(s));
        s.once('error', reject);
      });
    } catch (e) {
      if (Date.now() > until) throw new Error(`cannot connect to ${sock}: ${String(e)}`);
      await sleep(50);
    }
  }
}

/** Splits a stream into lines and hands each parsed JSON object to `onMessage`. */
function jsonLines(s: net.Socket, onMessage: (m: Json) => void): void {
  let pending = '';
  s.setEncoding('utf8');
  s.on('data', (chunk: string) => {
    pending += chunk;
    let nl: number;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl).trim();
      pending = pending.slice(nl + 1);
      if (line === '') continue;
      try {
        onMessage(JSON.parse(line) as Json);
      } catch {
        /* a partial line from before a reconnect: ignore */
      }
    }
  });
}

/** A QMP client: one command at a time, events kept with their arrival time. */
export class Qmp {
  readonly events: { at: number; event: string; data: unknown }[] = [];
  private waiting: ((m: Json) => void)[] = [];

  private constructor(
    private readonly sock: net.Socket,
    private readonly log: (line: string) => void,
  ) {}

  static async connect(
    sockPath: string,
    log: (line: string) => void,
    timeoutMs = 10000,
  ): Promise<Qmp> {
    const s = await connectWhenReady(sockPath, timeoutMs);
    const q = new Qmp(s, log);
    const greeting = new Promise<Json>((resolve) => q.waiting.push(resolve));
    jsonLines(s, (m) => {
      log(`<- ${JSON.stringify(m)}`);
      if (typeof m.event === 'string') {
        q.events.push({ at: Date.now(), event: m.event, data: m.data });
        return;
      }
      q.waiting.shift()?.(m);
    });
    await withTimeout('QMP greeting', timeoutMs, greeting);
    await q.execute('qmp_capabilities');
    return q;
  }

  async execute<T = unknown>(command: string, args?: Json, timeoutMs = 10000): Promise<T> {
    const reply = new Promise<Json>((resolve) => this.waiting.push(resolve));
    const msg = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command });
    this.log(`-> ${msg}`);
    this.sock.write(msg + '\n');
    const m = await withTimeout(`QMP ${command}`, timeoutMs, reply);
    if (m.error) throw new Error(`QMP ${command}: ${JSON.stringify(m.error)}`);
    return m.return as T;
  }

  close(): void {
    this.sock.destroy();
  }
}

/** What a test needs of a booted guest: run a command in it (as root, with bash). */
export interface GuestShell {
  run(cmd: string, timeoutMs?: number): Promise<RunResult>;
  sh(cmd: string, timeoutMs?: number): Promise<string>;
}

/**
 * The client of the test's command runner in the guest (test/e2e/guest/runner.js) on its
 * own virtio-serial port, whatever made the socket: QEMU run by hand (Vm) or libvirt
 * (libvirt-vm.ts). Every request and answer goes to a transcript (JSON lines).
 */
export class GuestRunner implements GuestShell {
  bootId = '';
  private nextId = 1;
  private replies = new Map<number, (m: Json) => void>();
  private ready?: (m: Json) => void;

  private constructor(
    private readonly sock: net.Socket,
    private readonly transcript: ReturnType<typeof createWriteStream>,
  ) {}

  /**
   * Connects to `sockPath` (retrying until it is there) and waits for the runner's
   * `ready`; rejects when `died` does (the VM went away during boot).
   */
  static async connect(
    sockPath: string,
    transcriptPath: string,
    bootTimeoutMs: number,
    died?: Promise<never>,
  ): Promise<GuestRunner> {
    const sock = await connectWhenReady(sockPath, 10000);
    const r = new GuestRunner(sock, createWriteStream(transcriptPath, { flags: 'a' }));
    const readyMsg = new Promise<Json>((resolve) => (r.ready = resolve));
    jsonLines(sock, (m) => {
      r.transcript.write(JSON.stringify({ at: Date.now(), dir: 'in', ...m }) + '\n');
      if (m.ready) return r.ready?.(m);
      const cb = typeof m.id === 'number' ? r.replies.get(m.id) : undefined;
      if (cb) {
        r.replies.delete(m.id as number);
        cb(m);
      }
    });
    try {
      const waited = withTimeout(
        'guest boot until the test runner answers',
        bootTimeoutMs,
        readyMsg,
      );
      const ready = await (died ? Promise.race([waited, died]) : waited);
      r.bootId = String(ready.bootId);
      return r;
    } catch (e) {
      r.close();
      throw e;
    }
  }

  /** Runs `cmd` with bash in the guest (as root) and returns what it did. */
  async run(cmd: string, timeoutMs = 60_000): Promise<RunResult> {
    const id = this.nextId++;
    const reply = new Promise<Json>((resolve) => this.replies.set(id, resolve));
    const req = { id, cmd, timeoutMs };
    this.transcript.write(JSON.stringify({ at: Date.now(), dir: 'out', ...req }) + '\n');
    this.sock.write(JSON.stringify(req) + '\n');
    // The runner kills the command at timeoutMs; the margin covers a slow emulated guest.
    const m = await withTimeout(`guest command: ${cmd}`, timeoutMs + 30_000, reply);
    return {
      code: (m.code as number | null) ?? null,
      signal: (m.signal as string | null) ?? null,
      timedOut: Boolean(m.timedOut),
      stdout: String(m.stdout ?? ''),
      stderr: String(m.stderr ?? ''),
      ms: Number(m.ms ?? 0),
    };
  }

  /** Like run(), but throws with the command's output when it does not exit 0. */
  async sh(cmd: string, timeoutMs = 60_000): Promise<string> {
    const r = await this.run(cmd, timeoutMs);
    if (r.code !== 0)
      throw new Error(
        `guest command failed (code ${r.code}, signal ${r.signal}${r.timedOut ? ', timed out' : ''}): ${cmd}\n` +
          `stdout: ${r.stdout.slice(-4000)}\nstderr: ${r.stderr.slice(-4000)}`,
      );
    return r.stdout;
  }

  /** Sends `cmd` without waiting for an answer (a poweroff: the runner dies with the guest). */
  fire(cmd: string, timeoutMs = 5000): void {
    this.sock.write(JSON.stringify({ id: this.nextId++, cmd, timeoutMs }) + '\n');
  }

  /** Saves the guest's journal and kernel log into outDir (best effort, bounded). */
  async collectLogs(outDir: string): Promise<void> {
    const save = async (file: string, cmd: string) => {
      try {
        const r = await this.run(cmd, 20_000);
        await fsp.writeFile(path.join(outDir, file), r.stdout + r.stderr);
      } catch (e) {
        await fsp.writeFile(path.join(outDir, file), `could not collect: ${String(e)}\n`);
      }
    };
    // In parallel (the runner runs each request in its own process): bounded by ~50 s in all.
    await Promise.all([
      save('guest-journal.txt', 'journalctl -b --no-pager -o short-monotonic'),
      save('guest-dmesg.txt', 'dmesg'),
      save('guest-agent.log', 'journalctl -b --no-pager -o cat -u nestbroker-guest'),
    ]);
  }

  close(): void {
    this.sock.destroy();
    this.transcript.end();
  }
}

export class Vm implements GuestShell {
  readonly runDir: string;
  /** The nestbroker channel's chardev socket (QEMU listens; the host broker connects). */
  readonly channelSocket: string;
  /** QMP for the host broker. */
  readonly brokerQmpSocket: string;
  qmp!: Qmp;
  accel = 'unknown';
  readonly timings: Record<string, number> = {};
  bootId = '';

  private qemu?: ChildProcess;
  private exited?: Promise<void>;
  private runner?: GuestRunner;
  private qmpLog?: ReturnType<typeof createWriteStream>;

  private constructor(
    readonly opts: Required<VmOptions>,
    runDir: string,
  ) {
    this.runDir = runDir;
    this.channelSocket = path.join(runDir, 'ch0.sock');
    this.brokerQmpSocket = path.join(runDir, 'qmp.sock');
  }

  get pid(): number | undefined {
    return this.qemu?.pid;
  }

  /** Boots the guest and returns once the runner inside answered. */
  static async boot(o: VmOptions): Promise<Vm> {
    // The bound is for a hung guest, not a slow one: TCG boots take longer on a loaded machine.
    const opts: Required<VmOptions> = { memoryMiB: 1024, cpus: 2, bootTimeoutMs: 300_000, ...o };
    await fsp.mkdir(opts.outDir, { recursive: true });
    // Unix socket paths must stay under 108 bytes: a short temp dir, not outDir.
    // KVM where /dev/kvm is there AND works with `-cpu max`; otherwise software emulation.
    // A /dev/kvm without hardware virtualisation underneath (nested, as on this build
    // machine) can make QEMU abort at the first vCPU reset ("failed to set MSR"): that
    // costs well under a second, so try it once per process and remember.
    const attempts: boolean[] = Vm.kvmWorks === false || !kvmUsable() ? [false] : [true, false];
    let lastError: unknown;
    for (const useKvm of attempts) {
      const runDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-e2e-'));
      const vm = new Vm(opts, runDir);
      try {
        await vm.start(useKvm);
        if (useKvm) Vm.kvmWorks = vm.accel === 'kvm';
        return vm;
      } catch (e) {
        lastError = e;
        const exitedEarly = vm.qemu?.exitCode !== null || vm.qemu?.signalCode !== null;
        await vm.destroy();
        if (!(useKvm && exitedEarly)) throw e;
        Vm.kvmWorks = false;
        await fsp.appendFile(
          path.join(opts.outDir, 'accel.txt'),
          `KVM failed, falling back to tcg: ${String(e)}\n`,
        );
      }
    }
    throw lastError;
  }

  private static kvmWorks: boolean | undefined;

  private async start(useKvm: boolean): Promise<void> {
    const { imageDir, outDir, shareDir, memoryMiB, cpus } = this.opts;
    const t0 = Date.now();
    const overlay = path.join(this.runDir, 'overlay.qcow2');
    await new Promise<void>((resolve, reject) => {
      const p = spawn(
        'qemu-img',
        [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-F',
          'raw',
          '-b',
          path.join(imageDir, 'rootfs.ext4'),
          overlay,
        ],
        { stdio: ['ignore', 'ignore', 'inherit'] },
      );
      p.on('error', reject);
      p.on('exit', (code) =>
        code === 0 ? resolve() : reject(new Error(`qemu-img exited ${code}`)),
      );
    });
    this.qmpLog = createWriteStream(path.join(outDir, 'qmp-test.log'));
    // QEMU tries the -accel options in order (a /dev/kvm that cannot create a VM falls
    // back to tcg by itself; one that fails later is handled in boot()).
    const accel = useKvm ? ['-accel', 'kvm', '-accel', 'tcg'] : ['-accel', 'tcg'];
    const args = [
      ...accel,
      '-cpu',
      'max',
      '-smp',
      String(cpus),
      '-m',
      String(memoryMiB),
      '-display',
      'none',
      '-monitor',
      'none',
      '-no-reboot',
      '-nic',
      'none',
      '-serial',
      `file:${path.join(outDir, 'console.log')}`,
      '-kernel',
      path.join(imageDir, 'vmlinuz'),
      '-initrd',
      path.join(imageDir, 'initrd.img'),
      '-drive',
      `file=${overlay},format=qcow2,if=virtio`,
      // systemd.unified_cgroup_hierarchy=1 is already Debian 12's default; explicit here
      // because the test's point is cgroup v2.
      '-append',
      'console=ttyS0 root=/dev/vda rw quiet panic=-1 systemd.unified_cgroup_hierarchy=1',
      '-device',
      'virtio-serial',
      '-chardev',
      `socket,id=ch0,path=${this.channelSocket},server=on,wait=off`,
      '-device',
      'virtserialport,chardev=ch0,name=org.nestbroker.0',
      '-chardev',
      `socket,id=test0,path=${path.join(this.runDir, 'test.sock')},server=on,wait=off`,
      '-device',
      'virtserialport,chardev=test0,name=org.nestbroker.test',
      '-device',
      'virtio-balloon,id=balloon0',
      '-qmp',
      `unix:${this.brokerQmpSocket},server=on,wait=off`,
      '-qmp',
      `unix:${path.join(this.runDir, 'qmp-test.sock')},server=on,wait=off`,
      '-fsdev',
      `local,id=code,path=${shareDir},security_model=none,readonly=on`,
      '-device',
      'virtio-9p-pci,fsdev=code,mount_tag=code',
    ];
    await fsp.writeFile(
      path.join(outDir, 'qemu-cmdline.txt'),
      ['qemu-system-x86_64', ...args].join(' ') + '\n',
    );
    const stderr = createWriteStream(path.join(outDir, 'qemu.stderr'));
    this.qemu = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    this.qemu.stderr?.pipe(stderr);
    this.exited = new Promise<void>((resolve) => this.qemu!.once('exit', () => resolve()));
    const died = this.exited.then(() => {
      throw new Error(`QEMU exited during boot (see ${outDir}/qemu.stderr, console.log)`);
    });

    this.qmp = await Promise.race([
      Qmp.connect(path.join(this.runDir, 'qmp-test.sock'), (l) =>
        this.qmpLog?.write(`${Date.now()} ${l}\n`),
      ),
      died,
    ]);
    const kvm = await this.qmp.execute<{ enabled: boolean }>('query-kvm');
    this.accel = kvm.enabled ? 'kvm' : 'tcg';

    this.runner = await GuestRunner.connect(
      path.join(this.runDir, 'test.sock'),
      path.join(outDir, 'runner-transcript.jsonl'),
      this.opts.bootTimeoutMs,
      died,
    );
    this.bootId = this.runner.bootId;
    this.timings.bootMs = Date.now() - t0;
  }

  /** Runs `cmd` with bash in the guest (as root) and returns what it did. */
  run(cmd: string, timeoutMs = 60_000): Promise<RunResult> {
    if (!this.runner) throw new Error('guest runner is not connected');
    return this.runner.run(cmd, timeoutMs);
  }

  /** Like run(), but throws with the command's output when it does not exit 0. */
  sh(cmd: string, timeoutMs = 60_000): Promise<string> {
    if (!this.runner) throw new Error('guest runner is not connected');
    return this.runner.sh(cmd, timeoutMs);
  }

  /** Saves the guest's journal and kernel log into outDir (best effort, bounded). */
  async collectLogs(): Promise<void> {
    await this.runner?.collectLogs(this.opts.outDir);
  }

  /** Powers the guest off from inside; falls back to QMP quit, then to SIGKILL of our pid. */
  async poweroff(timeoutMs = 60_000): Promise<number> {
    const t0 = Date.now();
    if (this.qemu && this.qemu.exitCode === null && this.qemu.signalCode === null) {
      // The runner dies with the guest: do not wait for its reply.
      this.runner?.fire('systemctl poweroff');
      try {
        await withTimeout('guest poweroff', timeoutMs, this.exited!);
      } catch {
        await this.destroy();
      }
    }
    this.timings.poweroffMs = Date.now() - t0;
    await this.destroy();
    return this.timings.poweroffMs;
  }

  /** Ends QEMU by the pid this object started (QMP quit, SIGTERM, SIGKILL) and cleans up. */
  async destroy(): Promise<void> {
    const q = this.qemu;
    if (q && q.exitCode === null && q.signalCode === null && q.pid) {
      try {
        await withTimeout('QMP quit', 3000, this.qmp.execute('quit'));
      } catch {
        /* no QMP: signals below */
      }
      for (const [sig, wait] of [
        ['SIGTERM', 5000],
        ['SIGKILL', 5000],
      ] as const) {
        try {
          await withTimeout('QEMU exit', wait, this.exited!);
          break;
        } catch {
          try {
            process.kill(q.pid, sig);
          } catch {
            /* gone */
          }
        }
      }
    }
    this.runner?.close();
    this.qmp?.close();
    this.qmpLog?.end();
    if (existsSync(this.runDir)) await fsp.rm(this.runDir, { recursive: true, force: true });
  }
}
