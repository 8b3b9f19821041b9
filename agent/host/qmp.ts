/**
 * A small QMP client (QEMU Machine Protocol, docs/interop/qmp-spec.rst) over the VM's
 * unix monitor socket: read the greeting, leave capabilities negotiation with
 * `qmp_capabilities`, then `execute` commands one at a time, each with an `id` that the
 * reply echoes. Asynchronous events (`{"event": ...}`) may arrive between replies: they
 * are collected (BALLOON_CHANGE is useful to log) and never taken for a reply.
 *
 * Only the balloon is used (docs/host-broker.md: QMP `balloon` and `query-balloon`
 * shrink the guest's memory and confirm the actual size). `balloon` only ASKS the guest's
 * driver to give pages back: the size is confirmed by polling `query-balloon` until
 * `actual` reaches the target (measured under QEMU: 1024→512 MiB took ~3 s; a guest that
 * cannot give the memory back leaves `actual` short, which we report rather than wait for
 * ever).
 */
import { systemClock } from '../common/clock';
import net from 'node:net';
import { NestError } from '../common/errors';
import { withTimeout } from '../common/timeout';

export interface QmpGreeting {
  version?: { qemu?: { major: number; minor: number; micro: number }; package?: string };
  capabilities?: string[];
}

export interface QmpEvent {
  event: string;
  data?: unknown;
  timestamp?: { seconds: number; microseconds: number };
}

export interface BalloonResult {
  targetBytes: number;
  actualBytes: number;
  /** `actual` came within `toleranceBytes` of the target before the timeout. */
  reached: boolean;
  polls: number;
  ms: number;
}

export interface QmpOptions {
  /** How long connect + greeting + one command may take. */
  timeoutMs?: number;
  now?: () => number;
  sleep?: (ms: number) => Promise<void>;
}

const MAX_QMP_LINE = 1024 * 1024;

export class QmpClient {
  private sock: net.Socket | null = null;
  private buf = '';
  private nextId = 1;
  private pending = new Map<
    string,
    { resolve: (v: unknown) => void; reject: (e: Error) => void }
  >();
  private waitingGreeting: ((g: QmpGreeting) => void) | null = null;
  private closedError: Error | null = null;
  readonly events: QmpEvent[] = [];
  greeting: QmpGreeting | null = null;
  private readonly timeoutMs: number;
  private readonly now: () => number;
  private readonly sleep: (ms: number) => Promise<void>;

  constructor(
    readonly socketPath: string,
    opts: QmpOptions = {},
  ) {
    this.timeoutMs = opts.timeoutMs ?? 10_000;
    this.now = opts.now ?? (() => systemClock.monotonic());
    this.sleep = opts.sleep ?? ((ms) => new Promise((r) => setTimeout(r, ms)));
  }

  /** Connects, reads the greeting and negotiates capabilities (none are asked for). */
  async connect(): Promise<QmpGreeting> {
    const sock = net.connect(this.socketPath);
    this.sock = sock;
    sock.setEncoding('utf8');
    const greeting = new Promise<QmpGreeting>((resolve) => (this.waitingGreeting = resolve));
    sock.on('data', (chunk: string) => this.onData(chunk));
    sock.on('error', (err) =>
      this.fail(qmpError(`QMP socket ${this.socketPath}: ${err.message}`, err)),
    );
    sock.on('close', () => this.fail(qmpError(`QMP socket ${this.socketPath} closed`)));
    await this.bounded(
      new Promise<void>((resolve, reject) => {
        sock.once('connect', resolve);
        sock.once('error', reject);
      }),
      'connect',
    ).catch((err: Error) => {
      throw err instanceof NestError
        ? err
        : qmpError(`cannot connect to QMP socket ${this.socketPath}: ${err.message}`, err);
    });
    this.greeting = await this.bounded(greeting, 'greeting');
    await this.execute('qmp_capabilities');
    return this.greeting;
  }

  /** Runs one command; resolves with its `return`, rejects QMP_ERROR with QEMU's class and desc. */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    if (!this.sock) return Promise.reject(qmpError('QMP client is not connected'));
    const id = `nb-${this.nextId++}`;
    const line = JSON.stringify(
      args === undefined ? { execute: command, id } : { execute: command, arguments: args, id },
    );
    const p = new Promise<unknown>((resolve, reject) => this.pending.set(id, { resolve, reject }));
    this.sock.write(line + '\n');
    return this.bounded(p, command).finally(() => this.pending.delete(id));
  }

  /** Asks the guest's balloon driver for a new guest memory size (bytes). */
  async balloon(bytes: number): Promise<void> {
    if (!Number.isSafeInteger(bytes) || bytes <= 0)
      throw new NestError(
        'INPUT_INVALID',
        `balloon target must be a positive number of bytes, got ${bytes}`,
      );
    await this.execute('balloon', { value: bytes });
  }

  /** The guest's current memory size as the balloon sees it (bytes). */
  async queryBalloon(): Promise<number> {
    const r = (await this.execute('query-balloon')) as { actual?: unknown } | undefined;
    if (!r || typeof r.actual !== 'number')
      throw qmpError(`query-balloon returned no "actual": ${JSON.stringify(r)}`);
    return r.actual;
  }

  /**
   * Sets the balloon and polls `query-balloon` until `actual` is within tolerance of the
   * target, or the timeout passes. Never throws for a short balloon: the caller reports
   * the actual size (a guest whose memory is pinned cannot give it back).
   */
  async balloonTo(
    targetBytes: number,
    opts: { timeoutMs: number; pollMs?: number; toleranceBytes?: number },
  ): Promise<BalloonResult> {
    const t0 = this.now();
    const pollMs = opts.pollMs ?? 250;
    // The guest driver works in 4 KiB pages and QEMU reports whole pages: allow 1 MiB.
    const tolerance = opts.toleranceBytes ?? 1024 * 1024;
    await this.balloon(targetBytes);
    let polls = 0;
    let actual = await this.queryBalloon();
    polls++;
    while (Math.abs(actual - targetBytes) > tolerance && this.now() - t0 < opts.timeoutMs) {
      await this.sleep(pollMs);
      actual = await this.queryBalloon();
      polls++;
    }
    return {
      targetBytes,
      actualBytes: actual,
      reached: Math.abs(actual - targetBytes) <= tolerance,
      polls,
      ms: this.now() - t0,
    };
  }

  close(): void {
    this.fail(qmpError('QMP client closed'));
    this.sock?.destroy();
    this.sock = null;
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    if (this.buf.length > MAX_QMP_LINE && !this.buf.includes('\n')) {
      this.fail(qmpError(`QMP line longer than ${MAX_QMP_LINE} bytes`));
      this.sock?.destroy();
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onLine(line);
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.fail(qmpError(`QMP sent a line that is not JSON: ${line.slice(0, 200)}`));
      this.sock?.destroy();
      return;
    }
    if (msg.QMP !== undefined) {
      this.waitingGreeting?.(msg.QMP as QmpGreeting);
      this.waitingGreeting = null;
      return;
    }
    if (typeof msg.event === 'string') {
      this.events.push(msg as unknown as QmpEvent);
      if (this.events.length > 100) this.events.shift();
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    // A reply without our id (QEMU answers a command it could not parse without one)
    // goes to the oldest pending command: commands run one at a time, in order.
    const key = id ?? this.pending.keys().next().value;
    if (key === undefined) return;
    const waiter = this.pending.get(key);
    if (!waiter) return;
    this.pending.delete(key);
    if (msg.error !== undefined) {
      const e = msg.error as { class?: string; desc?: string };
      waiter.reject(
        new NestError('QMP_ERROR', `QMP error ${e.class ?? '?'}: ${e.desc ?? JSON.stringify(e)}`, {
          problems: [{ field: 'qmp', value: e.class, message: e.desc ?? '' }],
        }),
      );
    } else waiter.resolve(msg.return);
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const w of this.pending.values()) w.reject(err);
    this.pending.clear();
  }

  private bounded<T>(p: Promise<T>, what: string): Promise<T> {
    return withTimeout(
      p,
      this.timeoutMs,
      () =>
        new NestError(
          'TIMEOUT',
          `QMP ${what} on ${this.socketPath} took longer than ${this.timeoutMs} ms`,
        ),
    );
  }
}

function qmpError(message: string, cause?: unknown): NestError {
  return new NestError('QMP_ERROR', message, { cause });
}

/** Connects, runs `fn`, always closes. */
export async function withQmp<T>(
  socketPath: string,
  fn: (q: QmpClient) => Promise<T>,
  opts: QmpOptions = {},
): Promise<T> {
  const q = new QmpClient(socketPath, opts);
  try {
    await q.connect();
    return await fn(q);
  } finally {
    q.close();
  }
}
