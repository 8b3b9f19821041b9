/**
 * The kernel's floor (bench/kernel-floor.c; docs/performance.md, "The three floors"): the
 * C program compiled at bench time with the system's `cc`, and driven one timed run at a
 * time over its stdin/stdout, so that its runs interleave with the cascade's.
 */
import { execFile, spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface, type Interface } from 'node:readline';
import { promisify } from 'node:util';
import { REPO } from './common';

const run = promisify(execFile);

export const KERNEL_FLOOR_SOURCE = path.join(REPO, 'bench', 'kernel-floor.c');

/** Compiles bench/kernel-floor.c into a fresh temp directory; returns the binary's path. */
export async function compileKernelFloor(): Promise<{ bin: string; dir: string; cc: string }> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nestbroker-kernel-floor-'));
  const bin = path.join(dir, 'kernel-floor');
  const cc = process.env.CC ?? 'cc';
  try {
    await run(cc, ['-O2', '-o', bin, KERNEL_FLOOR_SOURCE]);
  } catch (err) {
    await fs.rm(dir, { recursive: true, force: true });
    const e = err as { stderr?: string; message: string };
    throw new Error(
      `the kernel floor needs a C compiler: ${cc} -O2 ${KERNEL_FLOOR_SOURCE} failed: ${e.stderr || e.message}`,
    );
  }
  const version = await run(cc, ['--version']).then(
    (r) => r.stdout.split('\n')[0],
    () => cc,
  );
  return { bin, dir, cc: version };
}

/** One action of a timed run, in rank order: a limit file written, or a group signalled. */
export type FloorAction =
  { kind: 'write'; file: string; value: string } | { kind: 'stop'; procs: string; events: string };

/** The running program with its spec loaded: `run()` is one timed run. */
export class KernelFloor {
  private lines: Interface;
  private waiting: ((line: string) => void) | null = null;
  private readonly early: string[] = [];
  private stderr = '';

  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    this.lines = createInterface({ input: child.stdout });
    this.lines.on('line', (l) => {
      const w = this.waiting;
      this.waiting = null;
      if (w) w(l);
      else this.early.push(l);
    });
    child.stderr.on('data', (b: Buffer) => (this.stderr += b.toString()));
  }

  private next(): Promise<string> {
    const l = this.early.shift();
    if (l !== undefined) return Promise.resolve(l);
    return new Promise((resolve, reject) => {
      const onExit = (): void =>
        reject(new Error(`kernel floor exited ${this.child.exitCode}: ${this.stderr}`));
      this.child.once('exit', onExit);
      this.waiting = (line) => {
        this.child.off('exit', onExit);
        resolve(line);
      };
    });
  }

  static async start(
    bin: string,
    specFile: string,
    actions: FloorAction[],
    held = false,
  ): Promise<KernelFloor> {
    const text = actions
      .map((a) => (a.kind === 'write' ? `W\t${a.file}\t${a.value}` : `S\t${a.procs}\t${a.events}`))
      .join('\n');
    await fs.writeFile(specFile, `${text}\n`);
    const child = spawn(bin, ['run', specFile, ...(held ? ['--held'] : [])], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const k = new KernelFloor(child);
    const first = await k.next();
    if (first !== `ready ${actions.length}`) {
      k.stop();
      throw new Error(`kernel floor did not start: ${first}`);
    }
    return k;
  }

  /** One timed run: ms to the last signal, and until every stopped group is empty. */
  async run(): Promise<{ signalledMs: number; emptyMs: number }> {
    this.child.stdin.write('run\n');
    const l = await this.next();
    const m = /^ok (\d+) (\d+)$/.exec(l);
    if (!m) throw new Error(`kernel floor: ${l}`);
    return { signalledMs: Number(m[1]) / 1e6, emptyMs: Number(m[2]) / 1e6 };
  }

  stop(): void {
    this.child.stdin.end();
    if (this.child.exitCode === null) this.child.kill('SIGTERM');
  }
}

/**
 * The disk's own cost in `dir` (the journal's directory): `samples` × (a 128-byte write +
 * fsync; the journal's atomic write: temp file, fdatasync, rename, fsync of the directory).
 */
export async function fsyncFloor(
  bin: string,
  dir: string,
  samples: number,
): Promise<{ fsyncMs: number[]; atomicMs: number[] }> {
  const { stdout } = await run(bin, ['fsync', dir, String(samples)]);
  const fsyncMs: number[] = [];
  const atomicMs: number[] = [];
  for (const l of stdout.trim().split('\n')) {
    const m = /^(\d+) (\d+)$/.exec(l);
    if (!m) throw new Error(`kernel floor fsync: ${l}`);
    fsyncMs.push(Number(m[1]) / 1e6);
    atomicMs.push(Number(m[2]) / 1e6);
  }
  return { fsyncMs, atomicMs };
}
