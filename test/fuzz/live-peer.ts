/**
 * The pieces of the live-daemon protocol fuzz (agents.fuzz.test.ts): a seeded
 * storm of hostile lines judged by an oracle, generated and streamed in batches, and a raw
 * peer that reads the daemon's replies all the while.
 *
 * Why batches, and why the peer must keep its event loop free: the host broker pings its
 * guest every second and gives up after four pings without a pong (demo/stack.ts:
 * heartbeat 1s / 4s). Building and judging 100 000 cases takes this process 10 to 20 s of
 * CPU. Done in one go after the handshake (as the 10 000-line version did), it answered no
 * ping: the host logged "guest missed its pongs: closing the connection" and redialled
 * every 5 s, the first write got EPIPE, and the wait for 'drain' on that socket never ended
 * (a destroyed socket emits no 'drain'). The test timed out, its `finally` never closed
 * the listening server, and jest stayed up after the run. Here a batch is a few ms, the
 * loop turns after each, and a close mid-storm fails the test at once, naming it.
 */
import type net from 'node:net';
import { readFileSync } from 'node:fs';
import { LineDecoder } from '../../agent/protocol/framing';
import type { Message } from '../../agent/protocol/messages';
import { MessageSchema, parseMessage } from '../../agent/protocol/schemas';
import { ProtocolFuzz, Rng } from '../helpers/fuzz';

export const MiB = 1024 * 1024;

/** Messages that would act on the daemon: kept out of the storm, sent on purpose after it. */
const ACTING = new Set(['notice', 'restore', 'cancel']);

/** CPU time (user + system) a process has used, in seconds, from /proc (USER_HZ 100). */
export function cpuSeconds(pid: number): number {
  // Fields after the command name (which may hold spaces), from field 3 on: utime is 14.
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** Resident set of a process, in MiB (one decimal), from /proc. */
export function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Math.round(Number(m[1]) / 102.4) / 10 : NaN;
}

/** One line in this many is also judged by parseMessage itself, which must agree. */
const CROSS_CHECK = 50;

/**
 * What the channel does with one decoded line (ChannelBase.line): a valid message is
 * delivered (its type is returned); an invalid one is answered with `error` ('reply'),
 * unless it claims to be an `error` itself ('silent': two peers that disagree on the schema
 * must not bounce errors for ever). The same rule as parseMessage on the same schema, without
 * composing the reply's text, which is most of parseMessage's cost on a bad line: the oracle
 * runs in this process beside the daemon, on 2 cores. `check`: ask parseMessage too.
 */
export function judge(line: string, check = false): 'reply' | 'silent' | Message['type'] {
  let verdict: 'reply' | 'silent' | Message['type'];
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch {
    raw = undefined;
    verdict = 'reply';
  }
  verdict ??= (() => {
    const p = MessageSchema.safeParse(raw);
    if (p.success) return (p.data as Message).type;
    const claimed =
      raw !== null && typeof raw === 'object' ? (raw as { type?: unknown }).type : undefined;
    return claimed === 'error' ? 'silent' : 'reply';
  })();
  if (check) {
    const p = parseMessage(line);
    const want = p.ok ? p.msg.type : p.error.type === 'error' ? 'silent' : 'reply';
    if (want !== verdict)
      throw new Error(`oracle disagrees with parseMessage (${want} vs ${verdict}) on ${line}`);
  }
  return verdict;
}

/**
 * The storm, case by case: the seeded generator (test/helpers/fuzz.ts) with every case that
 * would act dropped, and the oracle's count of the `error` replies the rest must get.
 */
export class Storm {
  /** Cases kept (each ends with '\n'). */
  lines = 0;
  bytes = 0;
  /** Lines the oracle (the same decoder and parser) says must be answered with `error`. */
  replies = 0;
  /** Lines that are valid messages (not acting: pings, pongs, acks...). */
  valid = 0;
  private readonly gen: ProtocolFuzz;
  private judged = 0;
  private readonly decoder = new LineDecoder();

  constructor(seed: number) {
    this.gen = new ProtocolFuzz(new Rng(seed));
  }

  /** The next `n` kept cases as one buffer. */
  batch(n: number): Buffer {
    const parts: Buffer[] = [];
    while (parts.length < n) {
      const bytes = Buffer.concat([this.gen.next().bytes, Buffer.from('\n')]);
      // Every case ends with '\n', so the decoder's state never carries from one case to
      // the next: judging case by case is judging the stream.
      let acts = false;
      let r = 0;
      let v = 0;
      for (const ev of this.decoder.push(bytes)) {
        if (ev.kind === 'resync') continue;
        if (ev.kind !== 'line') {
          r++;
          continue;
        }
        const j = judge(ev.line, this.judged++ % CROSS_CHECK === 0);
        if (j === 'reply') r++;
        else if (j !== 'silent') {
          v++;
          if (ACTING.has(j)) acts = true;
        }
      }
      if (acts) continue;
      this.replies += r;
      this.valid += v;
      this.bytes += bytes.length;
      parts.push(bytes);
    }
    this.lines += n;
    return Buffer.concat(parts);
  }
}

/** A raw peer on a socket: counts what comes back, answers the daemon's pings. */
export class RawPeer {
  /** Messages other than `error`, in order. */
  readonly got: Message[] = [];
  /** `error` replies. */
  errors = 0;
  /** Lines that are not valid messages (the daemons never send one: asserted 0). */
  invalid = 0;
  private errorsSeen = 0;
  /** Set when the daemon's side of the socket is gone (or the socket failed). */
  closedBy: Error | null = null;
  private readonly decoder = new LineDecoder(4 * 1024 * 1024);
  /** Resolves (with the reason) when the socket closes. */
  private readonly closed: Promise<Error>;
  /** Settles when the last write has been handed to the kernel (or failed). */
  private flushed: Promise<Error | null | undefined> = Promise.resolve(null);
  private waiters: { pred: (m: Message) => boolean; resolve: (m: Message) => void }[] = [];

  constructor(
    readonly sock: net.Socket,
    answerPings: boolean,
  ) {
    sock.on('error', (err) => (this.closedBy ??= err));
    this.closed = new Promise((resolve) =>
      sock.once('close', () => resolve((this.closedBy ??= new Error('the daemon closed it')))),
    );
    sock.on('data', (d: Buffer) => {
      for (const ev of this.decoder.push(d)) {
        if (ev.kind !== 'line') continue;
        // ~100 000 `error` replies: each is counted on a JSON.parse and a look at its code,
        // one in CROSS_CHECK is validated in full (and must be valid); every other message
        // is validated in full.
        let quick: { type?: unknown; code?: unknown } | null = null;
        try {
          quick = JSON.parse(ev.line) as { type?: unknown; code?: unknown } | null;
        } catch {
          // parseMessage below counts it as invalid.
        }
        if (quick?.type === 'error' && this.errorsSeen++ % CROSS_CHECK !== 0) {
          if (typeof quick.code === 'string' && quick.code.length > 0) this.errors++;
          else this.invalid++;
          continue;
        }
        const r = parseMessage(ev.line);
        if (!r.ok) {
          this.invalid++;
          continue;
        }
        const m = r.msg;
        if (m.type === 'error') this.errors++;
        else this.got.push(m);
        if (m.type === 'ping' && answerPings)
          this.send({ type: 'pong', id: `pong-${m.id}`, replyTo: m.id, t: m.t });
        this.waiters = this.waiters.filter((w) => (w.pred(m) ? (w.resolve(m), false) : true));
      }
    });
  }

  send(m: object): void {
    if (!this.sock.destroyed) this.sock.write(JSON.stringify(m) + '\n');
  }

  /**
   * Streams `lines` storm cases in batches, cut into writes of 1 byte to 16 KiB drawn from
   * `chunks` (the cut points do not depend on the batch size). After each batch the event
   * loop turns, so replies are read and pings answered while the storm goes on. Pacing:
   * what the kernel's socket buffer (~200 KiB) takes feeds the daemon while the next batch
   * is built; when the kernel takes no more, we wait until it has taken all that is queued
   * here, so neither side holds more than a batch or two. Rejects as soon as the socket
   * closes. `onBatch` runs after each batch (RSS samples).
   */
  async stream(
    storm: Storm,
    lines: number,
    chunks: Rng,
    opts: { batchLines?: number; onBatch?: () => void } = {},
  ): Promise<void> {
    const batchLines = opts.batchLines ?? 50;
    let pending: Buffer = Buffer.alloc(0);
    let want = chunks.int(1, 16 * 1024);
    while (storm.lines < lines) {
      pending = Buffer.concat([pending, storm.batch(Math.min(batchLines, lines - storm.lines))]);
      let pos = 0;
      while (pending.length - pos >= want) {
        this.writeChunk(pending.subarray(pos, pos + want), storm);
        pos += want;
        want = chunks.int(1, 16 * 1024);
      }
      pending = pending.subarray(pos);
      if (storm.lines === lines && pending.length > 0) this.writeChunk(pending, storm);
      opts.onBatch?.();
      if (this.sock.writableLength > 0) await this.drained(storm);
      else await new Promise<void>((r) => setImmediate(r));
    }
    await this.drained(storm);
  }

  private writeChunk(chunk: Buffer, storm: Storm): void {
    this.failIfClosed(storm);
    this.flushed = new Promise((resolve) => this.sock.write(chunk, resolve));
  }

  private closedError(storm: Storm): Error {
    return new Error(
      `the daemon's socket closed mid-storm, after ${storm.lines} lines: ${this.closedBy?.message ?? 'destroyed'}`,
    );
  }

  private failIfClosed(storm: Storm): void {
    if (this.closedBy || this.sock.destroyed) throw this.closedError(storm);
  }

  /** Everything written so far handed to the kernel; rejects if the socket closes first. */
  private async drained(storm: Storm): Promise<void> {
    this.failIfClosed(storm);
    const err = await Promise.race([this.flushed, this.closed]);
    if (err || this.closedBy) throw this.closedError(storm);
  }

  wait<T extends Message>(what: string, pred: (m: Message) => boolean, ms = 30_000): Promise<T> {
    const seen = this.got.find(pred);
    if (seen) return Promise.resolve(seen as T);
    return new Promise<T>((resolve, reject) => {
      const fail = (why: string): void => {
        clearTimeout(t);
        reject(new Error(`${why} waiting for ${what}`));
      };
      const t = setTimeout(() => fail(`timed out after ${ms} ms`), ms);
      // A closed socket will bring nothing more: fail now rather than at the timeout.
      void this.closed.then((e) => fail(`socket closed (${e.message})`));
      this.waiters.push({
        pred,
        resolve: (m) => {
          clearTimeout(t);
          resolve(m as T);
        },
      });
    });
  }
}
