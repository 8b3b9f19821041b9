/**
 * The client role (docs/architecture.md, "Two roles at every level"): links a level to the
 * broker above it. It sits on one channel to that broker (the guest is the server end:
 * virtio-serial port, unix or TLS socket), says `hello` with its inventory and the last
 * notice seq it applied, and answers what comes down:
 *
 *   notice | restore → ack (accepted | duplicate | rejected) → progress* → outcome
 *   cancel           → ack (cancelled | not-cancellable | rejected)
 *   plan             → plan-result (the local broker's dry run), or error
 *   ping             → pong
 *   anything invalid → error (the connection and all state stay)
 *
 * The checking, journaling and exactly-once execution live in the NoticeBook; this file
 * only speaks the protocol. A duplicate notice id gets its journaled outcome again.
 *
 * Capabilities (docs/protocol.md, "Versions and capabilities"): `hello` lists ours; the
 * broker's come in its `welcome`, and until then it is assumed to have none. Outcomes owed
 * from an earlier connection are sent once the welcome has said what the broker takes.
 * A broker older than capabilities refuses the field: its `error` about our hello gets a
 * second hello without it, and that connection then runs without any.
 */
import type { Logger } from '../common/log';
import { isNestError } from '../common/errors';
import {
  CAPABILITIES,
  CAP_CPU_UNPLUG,
  MAX_LINE_BYTES,
  CAP_MONOTONIC_CLOCK,
  CAP_OUTCOME_PARTS,
  CAP_PLAN,
  PROTOCOL_VERSION,
  newMessageId,
  type ErrorMsg,
  type Hello,
  type Message,
  type PlanRequest,
  type PlanResult,
  type Progress,
  type SenderClock,
  type Welcome,
} from '../protocol/messages';
import { errorReply, parseMessage } from '../protocol/schemas';
import { outcomeMessages } from '../protocol/outcome-parts';
import type { Notice, Outcome } from '../broker/types';
import type { ChildProgress } from '../broker/broker';
import { TokenBucket, type Channel } from '../transport/channel';
import type { NoticeBook } from './notices';
import { faultPoint } from '../common/fault';
import { systemClock, type Clock } from '../common/clock';

/** The channel to the broker above (agent/transport): validated messages in, messages out. */
export type ClientChannel = Channel;

export interface ClientOptions {
  channel: ClientChannel;
  book: NoticeBook;
  inventory(): Promise<Hello['inventory']>;
  /** The local broker's dry run for a `plan` request; absent: `plan` is answered with an error. */
  plan?(req: PlanRequest): Promise<Omit<PlanResult, 'type' | 'id' | 'replyTo'>>;
  log: Logger;
  /**
   * The guest kernel's online CPUs and MemTotal now (agent/guest/guest-facts.ts), for the
   * hello and every outcome; none when absent.
   */
  facts?(): { onlineCpus?: number[]; memTotal?: number };
  /**
   * How often the facts are read again to send a `facts` message when they changed
   * (docs/protocol.md, "facts (guest → host)"); default 1000 ms: two small kernel files a
   * second. 0: never.
   */
  factsIntervalMs?: number;
  clock?: Clock;
}

/** Readings of the broker's clock kept per connection (the least delayed one counts). */
const CLOCK_SAMPLES = 8;

/**
 * Progress is best effort, the outcome is not: progress lines beyond this rate are not
 * sent (counted and logged), so that a cascade over hundreds of projects (~2.5 progress
 * lines a project) stays within the broker's rate limit (agent/transport/channel.ts,
 * default 200/s, burst 400) with room for what must arrive: acks, outcome parts, the
 * outcome (a 100-project bench saw the host drop the outcome with the progress).
 */
export const PROGRESS_RATE = Object.freeze({ perSecond: 100, burst: 200 });

const PROGRESS_PHASES = new Set<Progress['phase']>([
  'notified',
  'shrunk',
  'stopping',
  'stopped',
  'started',
  'grown',
]);

export class Client {
  private open = false;
  private readonly channel: ClientChannel;
  private readonly book: NoticeBook;
  private readonly log: Logger;
  /** Notices whose outcome this connection still owes (sent when done, or again on reconnect). */
  private readonly owed = new Set<string>();
  private inbox: Promise<void> = Promise.resolve();
  private readonly progressBucket = new TokenBucket(PROGRESS_RATE);
  /** Progress lines not sent because of PROGRESS_RATE (for logs and tests). */
  progressDropped = 0;
  /** This connection's hello (an error about it may ask for a hello without capabilities). */
  private helloId: string | null = null;
  /** The broker refused our `capabilities` field on this connection: say hello without. */
  private legacyHello = false;
  /** The broker's capabilities from its welcome on this connection; null before it. */
  private peerCaps: ReadonlySet<string> | null = null;
  private readonly clock: Clock;
  /**
   * local monotonic − broker's monotonic, at each reading of the broker's clock on this
   * connection (welcome, its pings). The smallest is the reading that waited least on the
   * way, so the best estimate of the offset (NTP's minimum filter, RFC 5905 "Clock Filter
   * Algorithm"). Empty: the broker sends no clock; its wall deadline is converted instead.
   */
  private offsets: number[] = [];
  /** Our pings in flight (id → sent at, local monotonic): their pongs time the channel. */
  private readonly pings = new Map<string, number>();
  /** The facts as last sent on this connection (hello, outcome, facts), as JSON; null: none. */
  private factsSent: string | null = null;
  private factsTimer: NodeJS.Timeout | null = null;

  constructor(private readonly opts: ClientOptions) {
    this.channel = opts.channel;
    this.book = opts.book;
    this.log = opts.log.child({ role: 'client' });
    this.clock = opts.clock ?? systemClock;
    this.channel.on('open', () => this.opened());
    this.channel.on('close', () => {
      this.open = false;
      this.peerCaps = null;
      this.offsets = [];
      this.pings.clear();
      this.stopFacts();
    });
    // Messages are handled one after another, in the order they came: two notices in
    // flight at once must be checked (seq) and journaled in order.
    this.channel.on('message', (m) => {
      this.inbox = this.inbox
        .then(() => this.onMessage(m))
        .catch((err: unknown) => this.log.error({ err }, 'message handling failed'));
    });
    this.book.on('progress', (noticeId: string, ev: ChildProgress) => this.progress(noticeId, ev));
  }

  /** A new connection (also for a channel that was already open when the client was attached). */
  opened(): void {
    this.open = true;
    this.peerCaps = null;
    this.legacyHello = false;
    this.factsSent = null;
    this.stopFacts();
    void this.hello();
  }

  /** The broker's capabilities on this connection (empty before its welcome). */
  get brokerCapabilities(): readonly string[] {
    return [...(this.peerCaps ?? [])];
  }

  /** False when the message did not go (no peer, or it could not be encoded). */
  private send(msg: Message): boolean {
    if (!this.open) return false;
    try {
      return this.channel.send(msg) !== false;
    } catch (err) {
      this.log.warn({ err, type: msg.type }, 'could not send to the broker above');
      return false;
    }
  }

  private async hello(): Promise<void> {
    const inventory = await this.opts.inventory();
    const hello: Hello = {
      type: 'hello',
      id: newMessageId(),
      version: PROTOCOL_VERSION,
      guest: this.book.name,
      inventory,
      lastSeq: this.book.lastSeq,
    };
    if (!this.legacyHello) {
      hello.capabilities = [...CAPABILITIES, ...(this.opts.plan ? [CAP_PLAN] : [])];
      // The guest's CPUs and memory as its kernel has them, so the host can confirm a
      // removal (docs/protocol.md, "hello (guest → host)"). Left out of a legacy hello:
      // a broker older than capabilities is older than these fields too.
      const f = this.facts();
      Object.assign(hello, f);
      this.factsSent = JSON.stringify(f);
    }
    this.helloId = hello.id;
    this.send(hello);
    // Outcomes finished while the channel was down are sent again; the broker above
    // journals by notice id, so a repeat is harmless. One too large for a line waits for
    // the welcome, which says whether it may come in parts.
    this.sendOwed();
  }

  private facts(): { onlineCpus?: number[]; memTotal?: number } {
    let f: { onlineCpus?: number[]; memTotal?: number } = {};
    try {
      f = this.opts.facts?.() ?? {};
    } catch (err) {
      this.log.warn({ err }, 'could not read the online CPUs and MemTotal');
    }
    const out: { onlineCpus?: number[]; memTotal?: number } = {};
    if (f.onlineCpus !== undefined) out.onlineCpus = f.onlineCpus;
    if (f.memTotal !== undefined) out.memTotal = f.memTotal;
    return out;
  }

  private sendOwed(): void {
    for (const id of this.owed) {
      const rec = this.book.get(id);
      if (rec?.outcome) this.sendOutcome(rec.outcome);
    }
  }

  private welcomed(msg: Welcome): void {
    if (msg.version !== PROTOCOL_VERSION)
      this.log.error(
        { version: msg.version, ours: PROTOCOL_VERSION },
        'the broker above speaks another protocol version',
      );
    this.peerCaps = new Set(msg.capabilities ?? []);
    // A broker that lists monotonic-clock sends its clock here and pings on it
    // (docs/protocol.md, "Deadlines").
    this.offsets = [];
    if (this.peerCaps.has(CAP_MONOTONIC_CLOCK) && msg.clock !== undefined)
      this.noteClock(msg.clock);
    this.ping();
    this.log.info(
      { heartbeatMs: msg.heartbeatMs, capabilities: msg.capabilities ?? [] },
      'welcomed by the broker above',
    );
    // What waited for the welcome (an outcome over one line) goes now, in parts or cut.
    this.sendOwed();
    // A host that takes the facts hears when they change: a vCPU unplug completes after
    // our outcome (docs/protocol.md, "facts (guest → host)").
    const every = this.opts.factsIntervalMs ?? 1000;
    if (this.peerCaps.has(CAP_CPU_UNPLUG) && this.opts.facts && every > 0) {
      this.stopFacts();
      this.factsTimer = setInterval(() => this.checkFacts(), every);
      this.factsTimer.unref();
      this.checkFacts();
    }
  }

  /**
   * Reads the facts and sends a `facts` message when they differ from what this
   * connection last sent; false when nothing went (unchanged, no such host, channel down).
   */
  checkFacts(): boolean {
    if (!this.open || !this.peerCaps?.has(CAP_CPU_UNPLUG)) return false;
    const f = this.facts();
    if (f.onlineCpus === undefined && f.memTotal === undefined) return false;
    const key = JSON.stringify(f);
    if (key === this.factsSent) {
      // One line per check at debug, as the supervisor's ticks: that the watch is alive.
      this.log.debug({ ...f }, 'online CPUs / MemTotal checked: unchanged');
      return false;
    }
    if (!this.send({ type: 'facts', id: newMessageId(), ...f })) return false;
    this.factsSent = key;
    this.log.debug({ ...f }, 'sent the changed online CPUs / MemTotal');
    return true;
  }

  private stopFacts(): void {
    if (this.factsTimer) clearInterval(this.factsTimer);
    this.factsTimer = null;
  }

  /** An `error` naming our hello's unknown `capabilities` field: a broker older than them. */
  private refusedCapabilities(msg: ErrorMsg): boolean {
    if (this.legacyHello || msg.replyTo === undefined || msg.replyTo !== this.helloId) return false;
    return (msg.problems ?? []).some(
      // A broker older than the hello's fields names them (docs/protocol.md, "Versions and capabilities").
      (p) =>
        p.field === '(message)' &&
        ['"capabilities"', '"onlineCpus"', '"memTotal"'].some((f) => p.message.includes(f)),
    );
  }

  private async onMessage(raw: Message | string): Promise<void> {
    // Channels hand over validated messages; a raw line (a test, a bare socket) is checked here.
    const parsed = parseMessage(typeof raw === 'string' ? raw : JSON.stringify(raw));
    if (!parsed.ok) {
      this.log.warn({ problems: parsed.error.problems }, 'invalid message from the broker above');
      this.send(errorReply(parsed.error, newMessageId()));
      return;
    }
    const msg = parsed.msg;
    switch (msg.type) {
      case 'notice':
      case 'restore':
        return this.onNotice(msg.id, msg.notice, msg.type, this.localDeadline(msg.clock));
      case 'cancel': {
        try {
          const state = await this.book.cancel(msg.noticeId);
          this.send({
            type: 'ack',
            id: newMessageId(),
            replyTo: msg.id,
            noticeId: msg.noticeId,
            state,
          });
        } catch (err) {
          this.send({
            type: 'ack',
            id: newMessageId(),
            replyTo: msg.id,
            noticeId: msg.noticeId,
            state: 'rejected',
            error: errorOf(err),
          });
        }
        return;
      }
      case 'plan':
        // Read-only and independent of the notices: not queued behind them in the inbox.
        void this.onPlan(msg);
        return;
      case 'ping':
        this.send({ type: 'pong', id: newMessageId(), replyTo: msg.id, t: msg.t });
        if (this.offsets.length > 0) this.noteClock(msg.t);
        return;
      case 'welcome':
        return this.welcomed(msg);
      case 'error':
        if (this.refusedCapabilities(msg)) {
          this.log.info('the broker above takes no capabilities: saying hello without them');
          this.legacyHello = true;
          return this.hello();
        }
        this.log.warn({ msg }, 'the broker above reported an error');
        return;
      case 'pong': {
        const sent = this.pings.get(msg.replyTo);
        if (sent !== undefined) {
          this.pings.delete(msg.replyTo);
          this.book.margin.record('send', this.clock.monotonic() - sent);
        }
        return;
      }
      default:
        this.send({
          type: 'error',
          id: newMessageId(),
          replyTo: msg.id,
          code: 'PROTOCOL_INVALID',
          message: `a client does not accept "${msg.type}" messages`,
        });
    }
  }

  private async onPlan(msg: PlanRequest): Promise<void> {
    try {
      if (!this.opts.plan) throw new Error('this client has no planner');
      const body = await this.opts.plan(msg);
      this.send({ type: 'plan-result', id: newMessageId(), replyTo: msg.id, ...body });
    } catch (err) {
      const e = errorOf(err);
      this.send({
        type: 'error',
        id: newMessageId(),
        replyTo: msg.id,
        code: e.code,
        message: e.message.slice(0, 4000),
      });
    }
  }

  /** One reading of the broker's monotonic clock, taken as it arrived. */
  private noteClock(peer: number): void {
    this.offsets.push(this.clock.monotonic() - peer);
    if (this.offsets.length > CLOCK_SAMPLES) this.offsets.shift();
  }

  /**
   * A notice's deadline on our monotonic clock, converted once, on receipt. Its time left
   * is the broker's (deadline − sent, on the broker's clock), less how long the message
   * took to be read here: our clock now against the broker's `sent` through the offset.
   * That includes time this process could not run (SIGSTOP, a paused VM), so a notice that
   * waited past its deadline is stale whatever the wall clocks say. Undefined without the
   * broker's clock: the NoticeBook converts the wall deadline instead.
   */
  private localDeadline(c: SenderClock | undefined): number | undefined {
    if (!c) return undefined;
    const now = this.clock.monotonic();
    const transit =
      this.offsets.length > 0 ? Math.max(0, now - Math.min(...this.offsets) - c.sent) : 0;
    return now - transit + (c.deadline - c.sent);
  }

  /**
   * Times a round trip to the broker above: the outcome's send. Only to a broker that
   * listed monotonic-clock (it answers pings on its channel and keeps time with us); to
   * another the margin's round trip stays its prior (agent/common/end-margin.ts).
   */
  private ping(): void {
    if (!this.peerCaps?.has(CAP_MONOTONIC_CLOCK)) return;
    const id = newMessageId();
    const t = this.clock.monotonic();
    if (this.pings.size > 16) this.pings.clear();
    this.pings.set(id, t);
    if (!this.send({ type: 'ping', id, t })) this.pings.delete(id);
  }

  private async onNotice(
    msgId: string,
    notice: Notice,
    type: 'notice' | 'restore',
    deadlineMono?: number,
  ): Promise<void> {
    const expected = type === 'notice' ? 'reclaim' : 'restore';
    if (notice.kind !== expected) {
      this.send({
        type: 'ack',
        id: newMessageId(),
        replyTo: msgId,
        noticeId: notice.id,
        state: 'rejected',
        error: {
          code: 'PROTOCOL_INVALID',
          message: `a "${type}" message must carry a ${expected} notice, got kind "${notice.kind}"`,
        },
      });
      return;
    }
    let sub;
    try {
      sub = await this.book.submit(notice, 'upstream', { deadlineMono });
    } catch (err) {
      sub = { state: 'rejected' as const, error: errorOf(err), outcome: undefined };
    }
    const ack: Message = {
      type: 'ack',
      id: newMessageId(),
      replyTo: msgId,
      noticeId: notice.id,
      state: sub.state,
    };
    if (sub.error) ack.error = { code: sub.error.code, message: sub.error.message };
    this.send(ack);
    if (!sub.outcome) return;
    if (sub.state === 'accepted') faultPoint('after-ack');
    this.owed.add(notice.id);
    // The outcome follows when it is ready; the next message need not wait for it.
    sub.outcome.then(
      (outcome) => this.sendOutcome(outcome),
      (err: unknown) =>
        // AGENT_STOPPING: still owed; the next start resumes it and answers the replay.
        isNestError(err, 'AGENT_STOPPING')
          ? this.log.info({ noticeId: notice.id }, 'agent stopping: outcome owed to the next start')
          : this.log.error({ err, noticeId: notice.id }, 'notice ended without an outcome'),
    );
  }

  private sendOutcome(outcome: Outcome): void {
    if (!this.open) return; // sent again after the next hello
    // One line, or outcome-part messages then the summary when it is over the line cap
    // (~190+ projects, docs/performance.md) and the broker takes parts. Each send is
    // whole: a resend repeats every part.
    const msgs = outcomeMessages(outcome, { parts: this.peerCaps?.has(CAP_OUTCOME_PARTS) ?? true });
    // Before the welcome we do not know whether the broker takes parts: an outcome that
    // needs them stays owed until the welcome says (welcomed() sends it).
    if (this.peerCaps === null && msgs.length > 1) return;
    // The CPUs and memory the guest has as it answers, to a host that takes them
    // (docs/protocol.md, "outcome (guest → host)"), when they still fit the line.
    const last = msgs[msgs.length - 1];
    let factsKey: string | null = null;
    if (this.peerCaps?.has(CAP_CPU_UNPLUG) && last.type === 'outcome') {
      const f = this.facts();
      const withFacts = { ...last, ...f };
      if (Buffer.byteLength(JSON.stringify(withFacts)) + 1 <= MAX_LINE_BYTES) {
        msgs[msgs.length - 1] = withFacts;
        factsKey = JSON.stringify(f);
      }
    }
    for (const msg of msgs) {
      if (!this.send(msg)) return; // cut short: still owed, sent again after the next hello
    }
    if (factsKey !== null) this.factsSent = factsKey;
    this.owed.delete(outcome.noticeId);
    // The next notice's margin counts the channel as it is now, not as it was at the welcome.
    this.ping();
  }

  private progress(noticeId: string, ev: ChildProgress): void {
    const phase = ev.phase as Progress['phase'];
    if (!PROGRESS_PHASES.has(phase)) return;
    const rec = this.book.get(noticeId);
    if (!rec || rec.source !== 'upstream') return;
    const msg: Progress = {
      type: 'progress',
      id: newMessageId(),
      noticeId,
      project: ev.child,
      phase,
      action: (ev.action as Progress['action']) ?? 'unchanged',
      ms: typeof ev.ms === 'number' ? Math.max(0, Math.round(ev.ms)) : 0,
    };
    if (ev.exit !== undefined) msg.exit = ev.exit as Progress['exit'];
    if (!this.progressBucket.take()) {
      if (this.progressDropped++ % 1000 === 0)
        this.log.info({ dropped: this.progressDropped }, 'progress over its rate: not sent');
      return;
    }
    this.send(msg);
  }
}

function errorOf(err: unknown): { code: string; message: string } {
  if (isNestError(err)) return { code: err.code, message: err.message };
  return { code: 'INTERNAL', message: err instanceof Error ? err.message : String(err) };
}
