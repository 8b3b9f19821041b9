/**
 * A Channel carries protocol messages between the host broker and a guest agent,
 * whatever is underneath (virtio-serial, unix socket, mutual TLS). It frames
 * (framing.ts), validates (schemas.ts), answers pings and answers every invalid line
 * with an `error` message while keeping the connection and all state (docs/protocol.md).
 *
 * Events:
 *  - `open`    a peer is connected. Guest-side channels (UnixChannelServer,
 *              TlsChannelServer, VirtioSerialChannel) and the host's ReconnectingChannel
 *              are long-lived: `open` and `close` repeat as the peer comes and goes. The
 *              guest sends `hello` on every `open`.
 *  - `message` a validated Message.
 *  - `invalid` the `error` message that was (or, for an invalid `error`, was not) sent
 *              back for a line that failed framing or validation; for logs and tests.
 *  - `close`   the peer is gone.
 *
 * Sending while no peer is connected drops the message (send returns false): after a
 * reconnect the host resends what is unanswered and the guest answers from its journal
 * (docs/protocol.md), so a queue across connections would only deliver stale
 * messages ahead of `hello`. Every new connection starts with a 0xFF byte, so the peer
 * drops any half line left from an earlier one.
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import { silentLogger, type Logger } from '../common/log';
import { NestError } from '../common/errors';
import { LineDecoder, RESYNC, encode } from '../protocol/framing';
import { newMessageId, type ErrorMsg, type Message } from '../protocol/messages';
import { errorReply, parseMessage, type ParseFailure } from '../protocol/schemas';

export interface ChannelEvents {
  open: [];
  message: [Message];
  invalid: [ErrorMsg];
  close: [];
}

/** A typed facade over EventEmitter: listeners get the argument types of their event. */
export class TypedEmitter<E extends { [K in keyof E]: unknown[] }> {
  private readonly ee = new EventEmitter();
  on<K extends keyof E & string>(event: K, fn: (...args: E[K]) => void): this {
    this.ee.on(event, fn as (...args: unknown[]) => void);
    return this;
  }
  once<K extends keyof E & string>(event: K, fn: (...args: E[K]) => void): this {
    this.ee.once(event, fn as (...args: unknown[]) => void);
    return this;
  }
  off<K extends keyof E & string>(event: K, fn: (...args: E[K]) => void): this {
    this.ee.off(event, fn as (...args: unknown[]) => void);
    return this;
  }
  listenerCount<K extends keyof E & string>(event: K): number {
    return this.ee.listenerCount(event);
  }
  protected emit<K extends keyof E & string>(event: K, ...args: E[K]): boolean {
    return this.ee.emit(event, ...args);
  }
}

export interface Channel {
  /** Queues a message for the connected peer; never blocks. false: no peer, dropped. */
  send(msg: Message): boolean;
  /** Ends the channel for good (a server stops listening, a device is closed). */
  close(): Promise<void>;
  /** A peer is connected now. */
  readonly connected: boolean;
  on<K extends keyof ChannelEvents>(event: K, fn: (...args: ChannelEvents[K]) => void): this;
  once<K extends keyof ChannelEvents>(event: K, fn: (...args: ChannelEvents[K]) => void): this;
  off<K extends keyof ChannelEvents>(event: K, fn: (...args: ChannelEvents[K]) => void): this;
}

export interface ChannelOptions {
  log?: Logger;
  /** Answer each `ping` with a `pong` here (default true), so liveness never waits on agent work. */
  answerPings?: boolean;
  /**
   * Bytes a connected peer may leave unread before we give up on it (a socket is closed;
   * a virtio port, which cannot be closed from here, drops its oldest messages).
   */
  maxBufferedBytes?: number;
  /**
   * Per-connection token bucket on received lines (docs/reliability.md, "Limits"):
   * `perSecond` lines a second on average, `burst` at once. A line over the limit is
   * dropped unread; the peer gets an `error` RATE_LIMITED (at most one a second, so a flood
   * is not answered line for line) and keeps its connection. Unset: no limit (the daemons
   * always set one from their config: limits.messagesPerSecond / limits.messageBurst).
   * The replies that finish an exchange (RATE_EXEMPT) count against the bucket but are
   * never dropped: see handleFrames.
   */
  rateLimit?: RateLimit;
  now?: () => number;
}

export interface RateLimit {
  perSecond: number;
  burst: number;
}

export const DEFAULT_RATE_LIMIT: Readonly<RateLimit> = Object.freeze({
  perSecond: 200,
  burst: 400,
});
export const DEFAULT_MAX_BUFFERED_BYTES = 8 * 1024 * 1024;

/**
 * Messages delivered even over the rate limit (they still take a token when there is one):
 * the replies that finish an exchange the receiver started or is waiting for. A dropped
 * `outcome` or `outcome-part` would leave a notice unfinished until its deadline; a dropped
 * `ack`, `welcome` or `hello` would stall the handshake or make the host resend; a dropped
 * `pong` would look like a dead peer; a dropped `cancel` would let a notice run on. None of
 * them is answered by the channel, so delivering them cannot amplify a flood. Not exempt:
 * `ping` (the channel answers it), `notice`, `restore`, `progress`, `error`, and any line
 * that fails to parse — a flood of those is still cut to the rate.
 */
export const RATE_EXEMPT: ReadonlySet<Message['type']> = new Set<Message['type']>([
  'ack',
  'outcome',
  'outcome-part',
  'pong',
  'welcome',
  'hello',
  'cancel',
]);
/**
 * Cheap first look at a line over the limit: only a line that names an exempt type is
 * parsed (and then delivered only if it really is one); the rest is dropped unread.
 */
const MAY_BE_EXEMPT = /"type"\s*:\s*"(?:ack|outcome|outcome-part|pong|welcome|hello|cancel)"/;

/** A token bucket: `take()` is true while the rate allows one more. */
export class TokenBucket {
  private tokens: number;
  private at: number;
  constructor(
    private readonly limit: RateLimit,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.tokens = limit.burst;
    this.at = now();
  }
  take(): boolean {
    const t = this.now();
    this.tokens = Math.min(
      this.limit.burst,
      this.tokens + ((t - this.at) * this.limit.perSecond) / 1000,
    );
    this.at = t;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}

/** Framing, validation, ping answering and the open/close state common to every channel. */
export abstract class ChannelBase extends TypedEmitter<ChannelEvents> implements Channel {
  protected readonly log: Logger;
  protected readonly maxBufferedBytes: number;
  private readonly answerPings: boolean;
  private readonly decoder = new LineDecoder();
  private up = false;
  protected ended = false;
  /** Lines (valid or not) received since the current peer connected. */
  protected linesSinceOpen = 0;
  /**
   * Inside received(): the decoder has consumed the whole chunk, and a peer change seen in
   * it (virtio's 0xFF) has already reset it at the right byte, so it must not be reset again.
   */
  private receiving = false;
  private readonly rateLimit?: RateLimit;
  private readonly now: () => number;
  private bucket: TokenBucket | null = null;
  private lastLimitedReplyAt = -Infinity;
  /** Lines dropped by the rate limit since this channel was made (for tests and logs). */
  rateLimited = 0;

  constructor(opts: ChannelOptions = {}) {
    super();
    this.rateLimit = opts.rateLimit;
    this.now = opts.now ?? (() => performance.now());
    this.log = opts.log ?? silentLogger();
    this.answerPings = opts.answerPings ?? true;
    this.maxBufferedBytes = opts.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED_BYTES;
  }

  get connected(): boolean {
    return this.up && !this.ended;
  }

  send(msg: Message): boolean {
    // Oversize throws: a message we cannot send is a bug in its builder, not a runtime state.
    const line = encode(msg);
    if (!this.connected) {
      this.log.debug({ type: msg.type, id: msg.id }, 'no peer connected: message dropped');
      return false;
    }
    this.write(line);
    return true;
  }

  abstract close(): Promise<void>;

  /** Hands bytes to the transport; called only while connected. */
  protected abstract write(line: Buffer): void;

  /** The transport has a (new) peer. */
  protected peerUp(): void {
    if (this.ended || this.up) return;
    if (!this.receiving) this.decoder.reset();
    this.up = true;
    this.linesSinceOpen = 0;
    // Each connection gets a full bucket of its own.
    this.bucket = this.rateLimit ? new TokenBucket(this.rateLimit, this.now) : null;
    this.write(RESYNC);
    this.emit('open');
  }

  /** The peer is gone. */
  protected peerDown(): void {
    if (!this.up) return;
    this.up = false;
    if (!this.receiving) this.decoder.reset();
    this.emit('close');
  }

  /** A 0xFF arrived (every connection starts with one); virtio uses it to spot a new host. */
  protected onResync(): void {}

  /** Bytes from the peer. */
  protected received(chunk: Buffer): void {
    this.receiving = true;
    try {
      this.handleFrames(chunk);
    } finally {
      this.receiving = false;
    }
  }

  private handleFrames(chunk: Buffer): void {
    for (const ev of this.decoder.push(chunk)) {
      if (ev.kind !== 'resync') {
        this.linesSinceOpen++;
        if (this.bucket && !this.bucket.take()) {
          // Over the limit. A reply that finishes an exchange is delivered all the same
          // (RATE_EXEMPT); anything else, valid or not, is dropped.
          const exempt = ev.kind === 'line' ? this.exemptMessage(ev.line) : null;
          if (exempt) this.deliver(exempt);
          else this.limited();
          continue;
        }
      }
      switch (ev.kind) {
        case 'line':
          this.line(ev.line);
          break;
        case 'oversize':
          this.reject(
            {
              code: 'PROTOCOL_OVERSIZE',
              message: `line of ${ev.bytes} bytes is over the ${ev.limit}-byte cap; it was discarded`,
              problems: [{ field: '(line)', message: `${ev.bytes} bytes, cap ${ev.limit}` }],
            },
            false,
          );
          break;
        case 'invalid-utf8':
          this.reject(
            {
              code: 'PROTOCOL_INVALID',
              message: `line of ${ev.bytes} bytes is not valid UTF-8; it was discarded`,
              problems: [{ field: '(line)', message: 'not valid UTF-8' }],
            },
            false,
          );
          break;
        case 'resync':
          if (ev.discarded > 0)
            this.log.debug({ discarded: ev.discarded }, 'resync dropped a partial line');
          this.onResync();
          break;
      }
    }
  }

  private line(line: string): void {
    const r = parseMessage(line);
    if (!r.ok) {
      this.reject(r.error, r.error.type === 'error');
      return;
    }
    this.deliver(r.msg);
  }

  /** A line over the rate limit that is a valid RATE_EXEMPT message, or null. */
  private exemptMessage(line: string): Message | null {
    if (!MAY_BE_EXEMPT.test(line)) return null;
    const r = parseMessage(line);
    return r.ok && RATE_EXEMPT.has(r.msg.type) ? r.msg : null;
  }

  private deliver(msg: Message): void {
    if (msg.type === 'ping' && this.answerPings) {
      this.send({ type: 'pong', id: newMessageId(), replyTo: msg.id, t: msg.t });
    }
    this.emit('message', msg);
  }

  /** A line over the rate limit: dropped; the peer hears of it at most once a second. */
  private limited(): void {
    this.rateLimited++;
    const t = this.now();
    if (t - this.lastLimitedReplyAt < 1000) return;
    this.lastLimitedReplyAt = t;
    const limit = this.rateLimit!;
    this.log.warn(
      { dropped: this.rateLimited, ...limit },
      'peer over its rate limit: lines dropped',
    );
    this.send({
      type: 'error',
      id: newMessageId(),
      code: 'RATE_LIMITED',
      message: `over ${limit.perSecond} messages/s (burst ${limit.burst}): lines are being dropped unread; ${this.rateLimited} so far on this channel`,
    });
  }

  /**
   * Answers a bad line with an `error` message, except a bad `error` message: two peers
   * that disagree about the schema would otherwise bounce errors for ever.
   */
  private reject(failure: ParseFailure, silent: boolean): void {
    const reply = errorReply(failure, newMessageId());
    this.log.warn({ code: failure.code, problems: failure.problems }, failure.message);
    if (!silent) this.send(reply);
    this.emit('invalid', reply);
  }
}

/**
 * A channel over one stream socket at a time (unix or TLS). Guest-side servers call
 * `attach` for each accepted connection: a new one replaces the old (docs/protocol.md: one
 * host at a time); the one-shot client connection is a SocketChannel.
 */
export abstract class SocketBackedChannel extends ChannelBase {
  protected sock: net.Socket | null = null;

  protected attach(sock: net.Socket, firstChunk?: Buffer): void {
    if (this.ended) {
      sock.destroy();
      return;
    }
    const old = this.sock;
    if (old) {
      this.log.info('a new peer connection replaces the current one');
      this.sock = null;
      old.destroy();
      this.peerDown();
    }
    this.sock = sock;
    sock.setKeepAlive?.(true, 10_000);
    sock.on('data', (chunk: Buffer) => {
      if (this.sock === sock) this.received(chunk);
    });
    sock.on('error', (err) => this.log.debug({ err }, 'peer socket error'));
    sock.on('close', () => {
      if (this.sock !== sock) return;
      this.sock = null;
      this.peerDown();
      this.detached();
    });
    this.peerUp();
    if (firstChunk && firstChunk.length > 0) this.received(firstChunk);
  }

  /** Called after the attached socket closed by itself. */
  protected detached(): void {}

  protected write(line: Buffer): void {
    const sock = this.sock;
    if (!sock || sock.destroyed) return;
    sock.write(line);
    // A peer that stops reading would make Node buffer without bound: drop it instead.
    if (sock.writableLength > this.maxBufferedBytes) {
      this.log.warn(
        { buffered: sock.writableLength },
        'peer is not reading: closing its connection',
      );
      sock.destroy(new NestError('TRANSPORT', 'peer stopped reading'));
    }
  }

  protected endSocket(): void {
    const sock = this.sock;
    this.sock = null;
    if (sock) {
      // end() sends what is queued, then FIN; destroy soon after in case the peer hangs.
      sock.end();
      setTimeout(() => sock.destroy(), 1000).unref();
    }
    this.peerDown();
  }
}

/** One connection made by the host (connectUnix, connectTls): closes for good when it drops. */
export class SocketChannel extends SocketBackedChannel {
  constructor(sock: net.Socket, opts: ChannelOptions & { firstChunk?: Buffer } = {}) {
    super(opts);
    this.attach(sock, opts.firstChunk);
  }

  protected override detached(): void {
    this.ended = true;
  }

  async close(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    this.endSocket();
  }
}
