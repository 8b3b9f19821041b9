/**
 * The host broker's connections to its guests (docs/architecture.md, "A notice, end to
 * end"): one channel per configured guest, the hello/welcome check, acks awaited per
 * message, progress and outcomes (whole or in parts) recorded on the notice they answer.
 * The notice lifecycle (agent/host/notice-lifecycle.ts) and the operator verbs
 * (agent/host/host-broker.ts) are built on it.
 */
import { EventEmitter } from 'node:events';
import type { Notice, Outcome } from '../broker/types';
import { ErrorCodes, NestError, type ErrorCode } from '../common/errors';
import type { Logger } from '../common/log';
import {
  CAPABILITIES,
  CAP_MONOTONIC_CLOCK,
  CAP_PLAN,
  newMessageId,
  PROTOCOL_VERSION,
  type Hello,
  type Message,
  type PlanResult,
} from '../protocol/messages';
import type { Resources } from '../broker/types';
import { isParsedMessage, parseMessage, type ParseResult } from '../protocol/schemas';
import { OutcomeAssembler } from '../protocol/outcome-parts';
import { creditedByOutcome } from './books';
import type { GuestConfig, HostConfig } from './config';
import { faultPoint } from '../common/fault';
import type { VmActuator } from './actuator';
import { NoticeStore, type HostNoticeRecord, type HostProgress } from './notice-store';
import { restoreDeadline, systemClock, type Clock } from '../common/clock';

/** What the host side needs of a channel to one guest (agent/transport's Channel has it). */
export interface HostChannel {
  send(msg: Message): unknown;
  on(event: 'message', fn: (msg: unknown) => void): unknown;
  on(event: 'open', fn: () => void): unknown;
  on(event: 'close', fn: () => void): unknown;
  close(): unknown;
}

export type ChannelFactory = (guest: GuestConfig) => HostChannel;

export interface Link {
  channel: HostChannel;
  open: boolean;
  hello?: Hello;
  helloAt?: string;
  /**
   * The guest kernel's online CPUs and MemTotal as it last reported them (hello, outcome
   * or facts, docs/protocol.md "facts (guest → host)"): what confirms a real removal. Kept
   * across reconnects: the last word until the next one.
   */
  reported?: GuestReported;
  ackWaiters: Map<string, (ack: Extract<Message, { type: 'ack' }>) => void>;
  /** Outcome parts of this connection (outcomes larger than one line: outcome-parts.ts). */
  parts: OutcomeAssembler;
  /** Times an outcome with missing parts was asked for again, per notice, on this connection. */
  partRetries: Map<string, number>;
  /** `plan` requests waiting for their `plan-result` (or `error`), by message id. */
  planWaiters: Map<string, (r: PlanResult | NestError) => void>;
}

export interface GuestReported {
  onlineCpus?: number[];
  memTotal?: number;
  /** When it was received, and in which message. */
  at: string;
  from: 'hello' | 'outcome' | 'facts';
}

/** The guest's report in a hello or outcome message, or undefined when it has none. */
export function reportedOf(
  msg: { onlineCpus?: number[]; memTotal?: number },
  from: GuestReported['from'],
  at: Date,
): GuestReported | undefined {
  if (msg.onlineCpus === undefined && msg.memTotal === undefined) return undefined;
  const r: GuestReported = { at: at.toISOString(), from };
  if (msg.onlineCpus !== undefined) r.onlineCpus = [...msg.onlineCpus];
  if (msg.memTotal !== undefined) r.memTotal = msg.memTotal;
  return r;
}

/** How often one connection asks again for an outcome whose parts did not all arrive. */
const OUTCOME_PART_RETRIES = 3;

export interface HostBrokerDeps {
  config: Readonly<HostConfig>;
  actuator: VmActuator;
  connect: ChannelFactory;
  log: Logger;
  /** Bound on delivering one notice (send → ack). */
  deliverTimeoutMs?: number;
  /** How long to wait for the guest's answer to a cancel. */
  cancelTimeoutMs?: number;
  /** Durations, deadlines and timers on clock.monotonic(); clock.now() for timestamps only. */
  clock?: Clock;
}

/** The guests' channels and what arrives on them; the base of HostBroker. */
export abstract class GuestConnections extends EventEmitter {
  protected readonly store: NoticeStore;
  protected readonly links = new Map<string, Link>();
  /** Outcome waiters by notice id (the running lifecycle's apply step). */
  protected readonly outcomeWaiters = new Map<string, (o: Outcome | NestError) => void>();
  /**
   * The journal write of each outcome that has arrived: the lifecycle is told of an outcome
   * the moment it arrives (arriving by the deadline is what counts), and awaits this write
   * before it actuates anything (notice-lifecycle.ts).
   */
  protected readonly outcomeSaved = new Map<string, Promise<void>>();
  protected readonly guestsByName = new Map<string, GuestConfig>();
  protected readonly log: Logger;
  protected readonly clock: Clock;
  /** Each pending notice's deadline on clock.monotonic(): set at issue, or restored once. */
  protected readonly deadlines = new Map<string, number>();

  constructor(protected readonly deps: HostBrokerDeps) {
    super();
    this.log = deps.log.child({ role: 'host-broker' });
    this.clock = deps.clock ?? systemClock;
    this.store = new NoticeStore(deps.config.stateDir, this.log);
    for (const g of deps.config.guests) this.guestsByName.set(g.name, g);
  }

  protected guest(name: string): GuestConfig {
    const g = this.guestsByName.get(name);
    if (!g)
      throw new NestError('GUEST_UNKNOWN', `no guest named "${name}" in the host config`, {
        problems: [{ field: 'guest', value: name, message: 'not configured' }],
      });
    return g;
  }

  protected attach(g: GuestConfig): void {
    const channel = this.deps.connect(g);
    const link: Link = {
      channel,
      open: false,
      ackWaiters: new Map(),
      parts: new OutcomeAssembler(),
      partRetries: new Map(),
      planWaiters: new Map(),
    };
    this.links.set(g.name, link);
    const log = this.log.child({ guest: g.name });
    channel.on('open', () => {
      link.open = true;
      log.info('channel to guest open; waiting for hello');
    });
    channel.on('close', () => {
      if (link.open) log.warn('channel to guest closed');
      link.open = false;
      link.hello = undefined;
      link.parts.clear();
      link.partRetries.clear();
      for (const w of link.planWaiters.values())
        w(new NestError('GUEST_UNREACHABLE', `guest "${g.name}" went away before it answered`));
      link.planWaiters.clear();
    });
    channel.on('message', (raw) => this.onMessage(g, link, raw));
  }

  /**
   * The notice on the wire, with the host's monotonic clock (docs/reliability.md, "Time"):
   * the guest converts the deadline once, on receipt, to its own, whatever either wall
   * clock says.
   */
  protected noticeMessage(notice: Notice, link: Link | undefined): Message {
    const rec = this.store.get(notice.id);
    const clock =
      rec && link?.hello && takesClock(link.hello)
        ? { sent: this.clock.monotonic(), deadline: Math.max(0, this.deadlineOf(rec)) }
        : undefined;
    return notice.kind === 'reclaim'
      ? { type: 'notice', id: newMessageId(), notice, ...(clock ? { clock } : {}) }
      : { type: 'restore', id: newMessageId(), notice, ...(clock ? { clock } : {}) };
  }

  /** A notice's deadline on clock.monotonic(), converted once from the journal after a restart. */
  protected deadlineOf(rec: HostNoticeRecord): number {
    let d = this.deadlines.get(rec.notice.id);
    if (d === undefined) {
      d = restoreDeadline(rec, rec.notice.deadline, this.clock);
      this.deadlines.set(rec.notice.id, d);
    }
    return d;
  }

  /** Wall time for a record's timestamps (display only). */
  protected stamp(): string {
    return new Date(this.clock.now()).toISOString();
  }

  // ---------------------------------------------------------------- channel

  protected onMessage(g: GuestConfig, link: Link, raw: unknown): void {
    // The channel validated the line where it arrived (agent/transport/channel.ts); anything
    // else (a string, an object from elsewhere) is validated here.
    const parsed: ParseResult = isParsedMessage(raw)
      ? { ok: true, msg: raw }
      : parseMessage(typeof raw === 'string' ? raw : JSON.stringify(raw));
    // A child logger only when something is logged: progress lines arrive by the thousand at
    // 50 guests (docs/performance.md, "The host broker's own share at 50 guests").
    const log = (): Logger => this.log.child({ guest: g.name });
    if (!parsed.ok) {
      log().warn({ problems: parsed.error.problems }, 'invalid message from guest');
      return;
    }
    const msg = parsed.msg;
    switch (msg.type) {
      case 'hello':
        return void this.onHello(g, link, msg);
      case 'ack': {
        const w = link.ackWaiters.get(msg.replyTo);
        if (w) {
          link.ackWaiters.delete(msg.replyTo);
          w(msg);
        } else {
          const rec = this.store.get(msg.noticeId);
          if (rec && rec.notice.guest === g.name) this.onAck(rec, msg);
        }
        return;
      }
      case 'progress': {
        const rec = this.store.get(msg.noticeId);
        if (!rec || rec.notice.guest !== g.name) return;
        this.note(rec, msg.phase, {
          project: msg.project,
          action: msg.action,
          exit: msg.exit ?? null,
          ms: msg.ms,
        });
        return;
      }
      case 'outcome-part': {
        // Held only for a notice of this guest still waiting for its outcome.
        const rec = this.store.get(msg.noticeId);
        if (rec && rec.notice.guest === g.name && !rec.outcome) link.parts.add(msg);
        return;
      }
      case 'outcome': {
        link.reported = reportedOf(msg, 'outcome', new Date()) ?? link.reported;
        const whole = link.parts.complete(msg);
        if (!whole.ok) return this.outcomeIncomplete(g, link, msg.outcome.noticeId, whole);
        link.partRetries.delete(msg.outcome.noticeId);
        return void this.onOutcome(g, whole.outcome).catch((err: unknown) =>
          log().error({ err }, 'could not record an outcome'),
        );
      }
      case 'facts':
        // The guest's kernel changed (a vCPU went after its outcome): the actuator's confirm
        // wait reads this (agent/host/libvirt/actuator.ts; docs/libvirt.md, "Removal modes").
        link.reported = reportedOf(msg, 'facts', new Date()) ?? link.reported;
        log().debug({ reported: link.reported }, 'guest reported its online CPUs / MemTotal');
        return;
      // The channel answers every ping itself (agent/transport/channel.ts, answerPings):
      // answering here too would send two pongs for one ping. Pongs feed the heartbeat of
      // ReconnectingChannel (agent/transport/reconnect.ts), not the broker.
      case 'ping':
      case 'pong':
        return;
      case 'plan-result': {
        const w = link.planWaiters.get(msg.replyTo);
        link.planWaiters.delete(msg.replyTo);
        w?.(msg);
        return;
      }
      case 'error': {
        const w = msg.replyTo === undefined ? undefined : link.planWaiters.get(msg.replyTo);
        if (w) {
          link.planWaiters.delete(msg.replyTo!);
          const code = (msg.code in ErrorCodes ? msg.code : 'PROTOCOL_INVALID') as ErrorCode;
          w(new NestError(code, `guest "${g.name}" could not plan: ${msg.message}`));
          return;
        }
        log().warn({ code: msg.code, message: msg.message }, 'guest reported an error');
        return;
      }
      default:
        log().warn({ type: msg.type }, 'unexpected message type from a guest');
    }
  }

  protected async onHello(g: GuestConfig, link: Link, hello: Hello): Promise<void> {
    const log = this.log.child({ guest: g.name });
    if (hello.guest !== g.name || hello.version !== PROTOCOL_VERSION) {
      const why =
        hello.guest !== g.name
          ? `this channel belongs to guest "${g.name}", the peer says it is "${hello.guest}"`
          : `protocol version ${hello.version} is not ${PROTOCOL_VERSION}`;
      log.error({ hello: { guest: hello.guest, version: hello.version } }, why);
      this.sendTo(link, {
        type: 'error',
        id: newMessageId(),
        replyTo: hello.id,
        code: hello.guest !== g.name ? 'UNAUTHORIZED' : 'PROTOCOL_VERSION',
        message: why,
      });
      return;
    }
    link.hello = hello;
    link.helloAt = this.stamp();
    link.reported = reportedOf(hello, 'hello', new Date()) ?? link.reported;
    this.sendTo(link, {
      type: 'welcome',
      id: newMessageId(),
      replyTo: hello.id,
      version: PROTOCOL_VERSION,
      guest: g.name,
      heartbeatMs: this.deps.config.heartbeat.intervalMs,
      // We assemble outcome parts and send our monotonic clock (docs/protocol.md,
      // "Versions and capabilities").
      capabilities: [...CAPABILITIES],
      ...(takesClock(hello) ? { clock: this.clock.monotonic() } : {}),
    });
    log.info(
      {
        lastSeq: hello.lastSeq,
        projects: hello.inventory.projects.length,
        capabilities: hello.capabilities ?? [],
      },
      'guest said hello',
    );
    this.emit('hello', g.name);
    // Cancels the guest missed while away come first; then, in seq order, every notice
    // it has not answered. A notice it already has is answered from its journal.
    for (const rec of this.store.ofGuest(g.name)) {
      if (rec.cancelPending) {
        this.sendTo(link, { type: 'cancel', id: newMessageId(), noticeId: rec.notice.id });
        rec.cancelPending = false;
        await this.store.save(rec);
      }
    }
    for (const rec of this.store.ofGuest(g.name)) {
      if (rec.outcome) continue;
      // A late reclaim the guest had accepted (its lastSeq is past it): asked again, the
      // guest answers from its journal with what it did, and the outcome is reconciled
      // (notice-lifecycle.ts, reconcileLate).
      const lateAccepted =
        rec.state === 'late' && rec.notice.kind === 'reclaim' && rec.notice.seq <= hello.lastSeq;
      // A restore that ended late is on the books and the VM was raised: the guest must
      // carry it out, late or not (agent/client/notices.ts accepts a late restore).
      const lateRestore =
        rec.state === 'done' && rec.late === true && rec.notice.kind === 'restore';
      if (rec.state !== 'issued' && rec.state !== 'acked' && !lateAccepted && !lateRestore)
        continue;
      if (rec.notice.kind === 'restore' && !rec.actuation) continue;
      log.info({ noticeId: rec.notice.id, seq: rec.notice.seq }, 'sending an unanswered notice');
      this.request(link, rec.notice.id, this.noticeMessage(rec.notice, link))
        .then((ack) => this.onAck(rec, ack))
        .catch((err: unknown) => log.warn({ err, noticeId: rec.notice.id }, 'resend not acked'));
    }
  }

  protected onAck(rec: HostNoticeRecord, ack: Extract<Message, { type: 'ack' }>): void {
    if (ack.state === 'rejected') {
      if (rec.state === 'issued' || rec.state === 'acked') {
        rec.state = 'refused';
        rec.error = ack.error ?? { code: 'NOTICE_REJECTED', message: 'the guest rejected it' };
        void this.store.save(rec);
        this.note(rec, 'rejected');
        this.outcomeWaiters.get(rec.notice.id)?.(
          new NestError('NOTICE_REJECTED', rec.error.message),
        );
      }
      return;
    }
    if (ack.state !== 'accepted' && ack.state !== 'duplicate') return;
    if (rec.state === 'issued') {
      rec.state = 'acked';
      rec.ackedAt = this.stamp();
      void this.store.save(rec);
      this.note(rec, 'acked');
    }
  }

  /**
   * An outcome summary whose parts did not all arrive (lines lost to a reconnect or a
   * rate limit): not recorded. The notice is sent again; the guest answers the duplicate
   * from its journal with the whole outcome, every part again (a bounded number of times
   * per connection; after that the next hello resends it, or the deadline ends it).
   */
  protected outcomeIncomplete(
    g: GuestConfig,
    link: Link,
    noticeId: string,
    got: { missing: number[]; count: number },
  ): void {
    const log = this.log.child({ guest: g.name, noticeId });
    const rec = this.store.get(noticeId);
    if (!rec || rec.notice.guest !== g.name || rec.outcome) return;
    const tries = (link.partRetries.get(noticeId) ?? 0) + 1;
    link.partRetries.set(noticeId, tries);
    log.warn(
      { missing: got.missing.slice(0, 20), count: got.count, tries },
      'outcome arrived without all of its parts; not recorded',
    );
    if (tries > OUTCOME_PART_RETRIES) return;
    this.request(link, noticeId, this.noticeMessage(rec.notice, link))
      .then((ack) => this.onAck(rec, ack))
      .catch((err: unknown) => log.warn({ err }, 'asking again for the outcome failed'));
  }

  protected async onOutcome(g: GuestConfig, outcome: Outcome): Promise<void> {
    const rec = this.store.get(outcome.noticeId);
    if (!rec || rec.notice.guest !== g.name || outcome.guest !== g.name) {
      this.log.warn(
        { guest: g.name, noticeId: outcome.noticeId },
        'outcome for a notice this guest was not sent; ignored',
      );
      return;
    }
    if (rec.outcome) return; // a repeat after a reconnect: the first one stands
    rec.outcome = outcome;
    rec.outcomeAt = this.stamp();
    // The books credit at most what the notice asked for, whatever the guest claims.
    rec.credited = creditedByOutcome(rec.notice.change, outcome.freed);
    if (rec.state === 'issued' || rec.state === 'acked') rec.state = 'reported';
    const saved = this.store.save(rec);
    this.outcomeSaved.set(rec.notice.id, saved);
    this.note(rec, 'outcome', { ms: outcome.ms });
    this.outcomeWaiters.get(rec.notice.id)?.(outcome);
    try {
      await saved;
    } finally {
      if (this.outcomeSaved.get(rec.notice.id) === saved) this.outcomeSaved.delete(rec.notice.id);
    }
  }

  protected sendTo(link: Link, msg: Message): boolean {
    if (!link.open) return false;
    try {
      link.channel.send(msg);
      return true;
    } catch (err) {
      this.log.warn({ err, type: msg.type }, 'could not send to a guest');
      return false;
    }
  }

  /**
   * The guest's own dry run for `allocation` (its whole allocation after the change): what
   * its planner would do to each project. Asked over the channel (`plan` → `plan-result`);
   * nothing is journaled or changed on either side. Fails with GUEST_UNREACHABLE when the
   * guest is not connected, TIMEOUT when it does not answer in `timeoutMs`.
   */
  askPlan(
    guest: string,
    kind: 'reclaim' | 'restore',
    allocation: Resources,
    timeoutMs = 5_000,
  ): Promise<PlanResult> {
    const g = this.guest(guest);
    const link = this.links.get(g.name);
    if (!link?.open || !link.hello)
      return Promise.reject(
        new NestError('GUEST_UNREACHABLE', `guest "${g.name}" is not connected: no plan from it`),
      );
    // Only to a guest that said it answers it (docs/protocol.md, "Versions and capabilities").
    if (!(link.hello.capabilities ?? []).includes(CAP_PLAN))
      return Promise.reject(
        new NestError(
          'PROTOCOL_VERSION',
          `guest "${g.name}" does not offer a dry run (its hello lists no "${CAP_PLAN}" capability)`,
        ),
      );
    const id = newMessageId();
    return new Promise<PlanResult>((resolve, reject) => {
      const t = setTimeout(() => {
        link.planWaiters.delete(id);
        reject(
          new NestError('TIMEOUT', `guest "${g.name}" did not answer the plan in ${timeoutMs} ms`),
        );
      }, timeoutMs);
      link.planWaiters.set(id, (r) => {
        clearTimeout(t);
        if (r instanceof NestError) reject(r);
        else resolve(r);
      });
      if (!this.sendTo(link, { type: 'plan', id, kind, allocation })) {
        clearTimeout(t);
        link.planWaiters.delete(id);
        reject(new NestError('GUEST_UNREACHABLE', `guest "${g.name}" is not connected`));
      }
    });
  }

  /** Sends a message that the guest acknowledges, and waits for the ack. */
  protected request(
    link: Link,
    noticeId: string,
    msg: Message,
    timeoutMs = this.deps.cancelTimeoutMs ?? 5_000,
  ): Promise<Extract<Message, { type: 'ack' }>> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        link.ackWaiters.delete(msg.id);
        reject(new NestError('TIMEOUT', `guest did not acknowledge ${msg.type} for ${noticeId}`));
      }, timeoutMs);
      link.ackWaiters.set(msg.id, (ack) => {
        clearTimeout(t);
        resolve(ack);
      });
      if (!this.sendTo(link, msg)) {
        clearTimeout(t);
        link.ackWaiters.delete(msg.id);
        reject(new NestError('GUEST_UNREACHABLE', `guest is not connected`));
        return;
      }
      const rec = this.store.get(noticeId);
      if (rec && (msg.type === 'notice' || msg.type === 'restore')) {
        rec.sentAt ??= this.stamp();
        this.note(rec, 'sent');
        faultPoint('after-send');
      }
    });
  }

  protected note(rec: HostNoticeRecord, phase: string, extra: Partial<HostProgress> = {}): void {
    const ev: HostProgress = {
      noticeId: rec.notice.id,
      guest: rec.notice.guest,
      phase,
      ...extra,
      at: this.stamp(),
    };
    rec.progress.push(ev);
    if (rec.progress.length > 500) rec.progress.shift();
    this.emit('progress', ev);
  }
}

/** The guest takes the host's monotonic clock on welcome and notices (it listed the capability). */
function takesClock(hello: Hello): boolean {
  return hello.capabilities?.includes(CAP_MONOTONIC_CLOCK) ?? false;
}
