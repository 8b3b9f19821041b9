/**
 * Host side: a long-lived channel to one guest that reconnects with exponential backoff
 * and jitter, and detects a dead peer by heartbeats (docs/host-broker.md: reconnect with
 * backoff; heartbeats detect a dead peer). A TCP peer that vanished without a FIN, or a
 * hung guest agent behind a live QEMU chardev, only shows up as missing pongs.
 *
 * Events as Channel (channel.ts): `open`/`close` for each connection. Clock and timers
 * are injected so backoff can be tested step by step.
 */
import { silentLogger, type Logger } from '../common/log';
import { newMessageId, type ErrorMsg, type Message } from '../protocol/messages';
import { TypedEmitter, type Channel, type ChannelEvents } from './channel';
import { systemClock } from '../common/clock';

export interface Clock {
  /** Monotonic milliseconds (agent/common/clock.ts): a ping's `t`, and the guest reads the host's clock from it. */
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  /** [0, 1), for jitter. */
  random(): number;
}

export const realClock: Clock = {
  now: () => systemClock.monotonic(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
  random: () => Math.random(),
};

export interface BackoffOptions {
  initialMs?: number;
  maxMs?: number;
  factor?: number;
  /** ± this fraction of the delay, so many hosts do not retry in step. */
  jitter?: number;
}

export interface ReconnectOptions {
  /** Makes one connection (connectUnix / connectTls with its arguments bound). */
  connect: () => Promise<Channel>;
  backoff?: BackoffOptions;
  /** Ping every intervalMs; after `missed` pings in a row without a pong, the peer is dead. */
  heartbeat?: { intervalMs: number; missed: number } | null;
  clock?: Clock;
  log?: Logger;
  /**
   * Something that says the peer is back (libvirt's `Started` event for the guest's
   * domain): subscribed once at start() with retryNow, and unsubscribed at close() through
   * the function it returns, so a channel closed and made anew (a reload, a reconnect)
   * leaves no listener behind on the long-lived source.
   */
  wake?: (retryNow: () => void) => () => void;
}

/** delay for attempt n (0-based): min(max, initial·factorⁿ) · (1 ± jitter). */
export function backoffDelay(attempt: number, opts: BackoffOptions, random: () => number): number {
  const initial = opts.initialMs ?? 100;
  const max = opts.maxMs ?? 10_000;
  const factor = opts.factor ?? 2;
  const jitter = opts.jitter ?? 0.2;
  const base = Math.min(max, initial * Math.pow(factor, attempt));
  return Math.max(0, Math.round(base * (1 + jitter * (2 * random() - 1))));
}

export interface ReconnectEvents extends ChannelEvents {
  /** A connection attempt failed; the next one is in `delayMs`. */
  retry: [{ attempt: number; delayMs: number; error: Error }];
  /** The heartbeat gave up on the current connection. */
  dead: [{ missed: number }];
}

export class ReconnectingChannel extends TypedEmitter<ReconnectEvents> implements Channel {
  private readonly clock: Clock;
  private readonly log: Logger;
  private current: Channel | null = null;
  private attempt = 0;
  private timer: unknown = null;
  private beat: unknown = null;
  private missed = 0;
  private outstandingPing: string | null = null;
  private stopped = false;
  private connecting = false;
  private unwake: (() => void) | null = null;

  constructor(private readonly opts: ReconnectOptions) {
    super();
    this.clock = opts.clock ?? realClock;
    this.log = opts.log ?? silentLogger();
  }

  /** Starts connecting (and reconnecting until close()). */
  start(): this {
    if (this.opts.wake && !this.unwake && !this.stopped)
      this.unwake = this.opts.wake(() => this.retryNow());
    void this.tryConnect();
    return this;
  }

  get connected(): boolean {
    return this.current?.connected ?? false;
  }

  send(msg: Message): boolean {
    return this.current?.send(msg) ?? false;
  }

  /**
   * Tries at once instead of at the end of the backoff, when something says the peer is
   * back (libvirt's "Started" event for the guest's domain: agent/host/libvirt/domains.ts).
   * Does nothing while connected or connecting.
   */
  retryNow(): void {
    if (this.stopped || this.connecting || this.current) return;
    if (this.timer !== null) this.clock.clearTimeout(this.timer);
    this.timer = null;
    this.attempt = 0;
    void this.tryConnect();
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.unwake?.();
    this.unwake = null;
    if (this.timer !== null) this.clock.clearTimeout(this.timer);
    this.stopHeartbeat();
    const c = this.current;
    this.current = null;
    if (c) {
      await c.close();
      this.emit('close');
    }
  }

  private async tryConnect(): Promise<void> {
    if (this.stopped || this.connecting) return;
    this.timer = null;
    this.connecting = true;
    let ch: Channel;
    try {
      ch = await this.opts.connect();
    } catch (err) {
      this.connecting = false;
      if (this.stopped) return;
      const delayMs = backoffDelay(this.attempt, this.opts.backoff ?? {}, () =>
        this.clock.random(),
      );
      this.attempt++;
      this.log.info({ attempt: this.attempt, delayMs, err }, 'guest not reachable: retrying');
      this.emit('retry', { attempt: this.attempt, delayMs, error: err as Error });
      this.timer = this.clock.setTimeout(() => void this.tryConnect(), delayMs);
      return;
    }
    this.connecting = false;
    if (this.stopped) {
      await ch.close();
      return;
    }
    this.attempt = 0;
    this.current = ch;
    const onMessage = (m: Message): void => {
      if (ch !== this.current) return;
      if (m.type === 'pong') {
        // Any pong shows the peer alive, even a late one for an earlier ping.
        this.missed = 0;
        this.outstandingPing = null;
      }
      this.emit('message', m);
    };
    const onInvalid = (e: ErrorMsg): void => {
      if (ch === this.current) this.emit('invalid', e);
    };
    ch.on('message', onMessage);
    ch.on('invalid', onInvalid);
    ch.once('close', () => {
      ch.off('message', onMessage);
      ch.off('invalid', onInvalid);
      if (ch !== this.current) return;
      this.current = null;
      this.stopHeartbeat();
      this.emit('close');
      if (!this.stopped) this.scheduleAfterDrop();
    });
    this.startHeartbeat(ch);
    this.emit('open');
  }

  /** A connection that worked dropped: the first retry follows the initial delay. */
  private scheduleAfterDrop(): void {
    const delayMs = backoffDelay(0, this.opts.backoff ?? {}, () => this.clock.random());
    this.attempt = 1;
    this.timer = this.clock.setTimeout(() => void this.tryConnect(), delayMs);
  }

  private startHeartbeat(ch: Channel): void {
    const hb = this.opts.heartbeat;
    if (!hb) return;
    this.missed = 0;
    this.outstandingPing = null;
    const tick = (): void => {
      if (ch !== this.current) return;
      if (this.outstandingPing !== null) this.missed++;
      if (this.missed >= hb.missed) {
        this.log.warn({ missed: this.missed }, 'guest missed its pongs: closing the connection');
        this.emit('dead', { missed: this.missed });
        void ch.close();
        return;
      }
      const id = newMessageId();
      this.outstandingPing = id;
      ch.send({ type: 'ping', id, t: this.clock.now() });
      this.beat = this.clock.setTimeout(tick, hb.intervalMs);
    };
    this.beat = this.clock.setTimeout(tick, hb.intervalMs);
  }

  private stopHeartbeat(): void {
    if (this.beat !== null) this.clock.clearTimeout(this.beat);
    this.beat = null;
    this.outstandingPing = null;
    this.missed = 0;
  }
}
