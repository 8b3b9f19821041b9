/**
 * The notice book of a client: every notice a level receives (from the broker above, or
 * from a local operator) is checked, journaled BEFORE anything is done, carried out by
 * the local broker one at a time, and its outcome journaled. The same notice id has
 * effect once: a duplicate gets the journaled outcome (or waits for the one in flight),
 * and after a restart the notices that were accepted but not finished are resumed,
 * exactly once, with the per-child step journal (broker.ts) so no child is acted on twice.
 */
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import * as path from 'node:path';
import { Journal } from '../common/journal';
import { NestError, isNestError, type Problem } from '../common/errors';
import type { Logger } from '../common/log';
import type { Notice, Outcome, Resources } from '../broker/types';
import {
  NoticeStepJournal,
  type ChildProgress,
  type StepJournal,
  type StepJournalRecord,
  type StepStore,
} from '../broker/broker';
import { faultPoint } from '../common/fault';
import { bootId, restoreDeadline, systemClock, type Clock } from '../common/clock';
import { EndMargin } from '../common/end-margin';
import { MAX_DEADLINE_AHEAD_MS } from '../protocol/schemas';
import { byCodePoint } from '../common/order';

export type NoticeSource = 'upstream' | 'local';
export type NoticeState = 'accepted' | 'running' | 'done' | 'cancelled' | 'rejected';

export interface NoticeRecord {
  notice: Notice;
  source: NoticeSource;
  state: NoticeState;
  receivedAt: string;
  startedAt?: string;
  finishedAt?: string;
  /** How many times carrying it out was started (1, or 2 after a restart mid-notice). */
  runs: number;
  outcome?: Outcome;
  error?: { code: string; message: string };
  /**
   * The deadline on this machine's monotonic clock, converted once on receipt, and the
   * boot it belongs to (agent/common/clock.ts: a restart in the same boot keeps it).
   */
  deadlineMono?: number;
  bootId?: string;
}

/** How a notice arrived, on this machine's clock (the Client converts the wire's). */
export interface Arrival {
  /** The deadline on clock.monotonic(); absent: the notice's wall deadline, converted now. */
  deadlineMono?: number;
}

export interface CarryOutContext {
  signal: AbortSignal;
  /**
   * When the steps must be done, on clock.monotonic(): the notice's deadline less the time
   * its end needs (EndMargin.afterMs: the journal writes and the outcome's send after the
   * last step), so the outcome is at the broker above BEFORE the deadline.
   */
  deadline: number;
  /** How long before `deadline` a stop's grace ends, so the kill is over by then (EndMargin.killMs). */
  killMs: number;
  clock: Clock;
  /** Where the stops report how long each kill took. */
  margin: EndMargin;
  log: Logger;
  /** True when an earlier run of this agent started this notice and did not finish it. */
  resumed: boolean;
  steps: StepJournal<unknown>;
  onProgress(ev: ChildProgress): void;
}

/** The local broker as the client sees it. */
export interface LocalBroker {
  /** This level's name: a notice for another name is refused. */
  readonly name: string;
  /** Why this notice cannot be carried out (does not fit, ...); empty when it can. */
  check(notice: Notice): Promise<Problem[]>;
  /**
   * The level's allocation now, which every notice's `allocation` is checked against
   * (allocationProblems). A broker that keeps no allocation of its own leaves it out.
   */
  allocation?(): Resources;
  carryOut(notice: Notice, ctx: CarryOutContext): Promise<Outcome>;
}

export type AckState = 'accepted' | 'duplicate' | 'rejected';

export interface Submitted {
  state: AckState;
  error?: { code: string; message: string; problems?: Problem[] };
  /** Resolves with the outcome (journaled first); absent when rejected. */
  outcome?: Promise<Outcome>;
}

/** Journal keys are file names: a notice id that is not one becomes a hash. */
export function noticeKey(id: string): string {
  // ≤ 60 characters, so `<key>--<project>` (project ≤ 63) stays within a journal key (128).
  return /^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$/.test(id)
    ? id
    : `h-${createHash('sha256').update(id).digest('hex').slice(0, 40)}`;
}

export interface NoticeBookOptions {
  /**
   * Notices accepted and not yet finished beyond which a new one is refused with
   * NOTICE_BACKLOG (docs/reliability.md: a cap on pending notices). Default 64.
   */
  maxPending?: number;
  /** Finished records kept on disk (default RETAIN_FINAL_ON_DISK). */
  retainOnDisk?: number;
  clock?: Clock;
  /** The measured time a notice's end takes (shared with the client and the stops). */
  margin?: EndMargin;
}

export const DEFAULT_MAX_PENDING_NOTICES = 64;

/**
 * Finished notices (done, cancelled, rejected) kept in memory (docs/reliability.md, "Load
 * held": memory flat): older ones are dropped from memory only. Their journal records stay
 * (up to RETAIN_FINAL_ON_DISK), and a replay of one is answered from the journal on disk.
 */
export const RETAIN_FINAL_NOTICES = 256;

/**
 * Finished notices kept on disk (docs/reliability.md, "Load held": nothing grows without
 * bound; every notice, even a rejected replay, is a journal file). Beyond this the oldest
 * finished records and their step records are deleted. A replay of a deleted upstream
 * notice is still refused as stale by its seq: the record holding the highest upstream seq
 * is never deleted, so `lastSeq` survives restarts.
 */
export const RETAIN_FINAL_ON_DISK = 1024;

const isFinal = (r: NoticeRecord): boolean =>
  r.state === 'done' || r.state === 'cancelled' || r.state === 'rejected';

export class NoticeBook extends EventEmitter {
  private readonly notices: Journal<NoticeRecord>;
  private readonly steps: Journal<StepJournalRecord<unknown>>;
  private readonly records = new Map<string, NoticeRecord>();
  private readonly inflight = new Map<string, Promise<Outcome>>();
  private queue: Promise<unknown> = Promise.resolve();
  private admitting: Promise<void> = Promise.resolve();
  private readonly stopping = new AbortController();
  /** Outcomes being journaled, logged and emitted (drain() waits for them). */
  private readonly finishing = new Set<Promise<Outcome>>();
  private lastSeqValue = 0;
  /** The record that set lastSeqValue: kept on disk whatever its age. */
  private lastSeqId: string | undefined;
  /** Ids of finished records on disk, oldest finish first (a Set keeps insertion order). */
  private readonly finalOnDisk = new Set<string>();
  private pruning: Promise<void> = Promise.resolve();
  private readonly retainOnDisk: number;
  private readonly maxPending: number;
  private readonly clock: Clock;
  readonly margin: EndMargin;
  /**
   * What was left of each pending notice's deadline when this agent took it (on arrival,
   * or when init() restored it from the journal): the base of its margins. The deadline
   * itself is the record's deadlineMono, the one place it is kept.
   */
  private readonly budgets = new Map<string, number>();

  constructor(
    stateDir: string,
    private readonly broker: LocalBroker,
    private readonly log: Logger,
    opts: NoticeBookOptions = {},
  ) {
    super();
    this.maxPending = opts.maxPending ?? DEFAULT_MAX_PENDING_NOTICES;
    this.clock = opts.clock ?? systemClock;
    this.margin = opts.margin ?? new EndMargin();
    this.retainOnDisk = opts.retainOnDisk ?? RETAIN_FINAL_ON_DISK;
    this.notices = new Journal(path.join(stateDir, 'notices'));
    this.steps = new Journal(path.join(stateDir, 'steps'));
  }

  get name(): string {
    return this.broker.name;
  }

  /** Highest seq of an upstream notice accepted here (for `hello`). */
  get lastSeq(): number {
    return this.lastSeqValue;
  }

  /** Loads the journal. Call resume() once the local broker is ready to act. */
  async init(): Promise<void> {
    await this.notices.init();
    await this.steps.init();
    const loaded = (await this.notices.all()).map((r) => r.value);
    for (const value of loaded) this.noteSeq(value);
    const finished = (r: NoticeRecord): string => r.finishedAt ?? r.receivedAt;
    for (const value of loaded.sort((a, b) => byCodePoint(finished(a), finished(b)))) {
      this.records.set(value.notice.id, value);
      if (value.state === 'accepted' || value.state === 'running') this.deadlineOf(value);
    }
    this.evict();
  }

  /** Resolves once the deletions of old records decided so far are done (for tests). */
  async pruned(): Promise<void> {
    await this.pruning;
  }

  /**
   * Deletes the oldest finished records beyond retainOnDisk, with their step records.
   * Called from evict, i.e. after a finished record's write resolved; the deletions run
   * one after another in the background, and a failure is logged, never fatal.
   */
  private prune(): void {
    for (const [id, r] of this.records) if (isFinal(r)) this.finalOnDisk.add(id);
    let excess = this.finalOnDisk.size - this.retainOnDisk;
    if (excess <= 0) return;
    const doomed: string[] = [];
    for (const id of this.finalOnDisk) {
      if (excess <= 0) break;
      if (id === this.lastSeqId || this.inflight.has(id)) continue;
      doomed.push(id);
      excess--;
    }
    for (const id of doomed) {
      this.finalOnDisk.delete(id);
      this.records.delete(id);
    }
    this.pruning = this.pruning.then(async () => {
      for (const id of doomed) {
        const key = noticeKey(id);
        await Promise.all([this.notices.delete(key), this.steps.delete(`${key}--steps`)]).catch(
          (err: unknown) => this.log.warn({ err, noticeId: id }, 'could not delete an old notice'),
        );
      }
    });
  }

  /** Drops the oldest finished records beyond RETAIN_FINAL_NOTICES from memory. */
  private evict(): void {
    this.prune();
    let finals = 0;
    for (const r of this.records.values()) if (isFinal(r)) finals++;
    if (finals <= RETAIN_FINAL_NOTICES) return;
    // A Map iterates in insertion order: the oldest first.
    for (const [id, r] of this.records) {
      if (finals <= RETAIN_FINAL_NOTICES) break;
      if (!isFinal(r) || this.inflight.has(id)) continue;
      this.records.delete(id);
      finals--;
    }
  }

  /** A record no longer in memory, from the journal (its id checked: keys may be hashes). */
  private async recall(id: string): Promise<NoticeRecord | undefined> {
    const rec = await this.notices.get(noticeKey(id)).catch(() => undefined);
    return rec?.notice.id === id ? rec : undefined;
  }

  /** Carries out, once, every notice an earlier run accepted and did not finish. */
  resume(): Promise<Outcome>[] {
    const unfinished = [...this.records.values()]
      .filter((r) => r.state === 'accepted' || r.state === 'running')
      .sort((a, b) => byCodePoint(a.receivedAt, b.receivedAt) || a.notice.seq - b.notice.seq);
    return unfinished.map((r) => {
      this.log.info(
        { noticeId: r.notice.id, state: r.state },
        'resuming a notice left unfinished by an earlier run',
      );
      return this.enqueue(r);
    });
  }

  list(): NoticeRecord[] {
    return [...this.records.values()].sort((a, b) => byCodePoint(b.receivedAt, a.receivedAt));
  }

  get(id: string): NoticeRecord | undefined {
    return this.records.get(id);
  }

  /**
   * Validate → journal → queue. Never acts on a notice it could not journal. Admissions
   * are one at a time, so the duplicate and seq checks see every earlier notice.
   */
  submit(notice: Notice, source: NoticeSource, arrival: Arrival = {}): Promise<Submitted> {
    // Converted once, on receipt, before the wait for earlier admissions: the time spent
    // queued counts against the notice.
    const deadlineMono = arrival.deadlineMono ?? restoreDeadline({}, notice.deadline, this.clock);
    const p = this.admitting.then(() => this.admit(notice, source, deadlineMono));
    this.admitting = p.then(
      () => undefined,
      () => undefined,
    );
    return p;
  }

  private async admit(
    notice: Notice,
    source: NoticeSource,
    deadlineMono: number,
  ): Promise<Submitted> {
    const log = this.log.child({ noticeId: notice.id });
    const known = this.records.get(notice.id) ?? (await this.recall(notice.id));
    if (known) {
      log.info({ state: known.state }, 'duplicate notice: not acted on again');
      if (known.state === 'rejected') return { state: 'rejected', error: known.error };
      if (known.state === 'done' && known.outcome)
        return { state: 'duplicate', outcome: Promise.resolve(known.outcome) };
      const running = this.inflight.get(notice.id);
      return {
        state: 'duplicate',
        outcome: running ?? Promise.reject(new NestError('NOTICE_UNKNOWN', 'notice was cancelled')),
      };
    }
    const pending = this.pendingCount();
    if (pending >= this.maxPending) {
      // Not journaled: the refusal is about now, not about the notice; a resend later may fit.
      const message = `${pending} notices are pending (cap ${this.maxPending}); refused, nothing done`;
      log.warn({ pending, cap: this.maxPending }, 'notice refused: too many pending');
      return { state: 'rejected', error: { code: 'NOTICE_BACKLOG', message } };
    }
    const { problems, mismatch } = await this.validate(notice, source, deadlineMono);
    if (problems.length > 0) {
      // A replayed seq, or a deadline already past on arrival (the broker above has given
      // up on it: a guest stopped past the deadline must not act on it when it wakes).
      const code = problems.some(
        (p) => (p.field === 'seq' || p.field === 'deadline') && p.message.startsWith('stale'),
      )
        ? 'NOTICE_STALE'
        : mismatch
          ? 'ALLOCATION_MISMATCH'
          : problems.some((p) => p.field === 'leavingCpus')
            ? 'LEAVING_CPUS_INVALID'
            : 'NOTICE_REJECTED';
      const error = {
        code,
        message: problems.map((p) => `${p.field}: ${p.message}`).join('; '),
        problems,
      };
      log.warn({ problems }, 'notice rejected');
      // A rejected notice is remembered (best effort) so a replay gets the same answer.
      const rec: NoticeRecord = {
        notice,
        source,
        state: 'rejected',
        receivedAt: new Date(this.clock.now()).toISOString(),
        runs: 0,
        error: { code, message: error.message },
      };
      await this.notices.put(noticeKey(notice.id), rec).then(
        () => {
          this.records.set(notice.id, rec);
          this.evict();
        },
        () => undefined,
      );
      return { state: 'rejected', error };
    }
    const rec: NoticeRecord = {
      notice,
      source,
      state: 'accepted',
      receivedAt: new Date(this.clock.now()).toISOString(),
      runs: 0,
      deadlineMono,
      bootId: bootId(),
    };
    this.budgets.set(notice.id, Math.max(0, deadlineMono - this.clock.monotonic()));
    try {
      await this.put(rec);
    } catch (err) {
      const message = isNestError(err) ? err.message : String(err);
      this.budgets.delete(notice.id);
      log.error({ err }, 'could not journal the notice: refused, nothing done');
      return { state: 'rejected', error: { code: 'JOURNAL_WRITE', message } };
    }
    this.records.set(notice.id, rec);
    this.noteSeq(rec);
    log.info({ source, kind: notice.kind, seq: notice.seq }, 'notice accepted and journaled');
    return { state: 'accepted', outcome: this.enqueue(rec) };
  }

  /**
   * Withdraws a notice whose work has not started. Serialised behind admissions: a cancel
   * that arrives while its notice is still being checked and journaled is answered about
   * that notice (docs/reliability.md), never "unknown notice" while the notice goes ahead.
   */
  cancel(id: string): Promise<'cancelled' | 'not-cancellable'> {
    const p = this.admitting.then(() => this.withdraw(id));
    this.admitting = p.then(
      () => undefined,
      () => undefined,
    );
    return p;
  }

  private async withdraw(id: string): Promise<'cancelled' | 'not-cancellable'> {
    const rec = this.records.get(id) ?? (await this.recall(id));
    if (!rec) throw new NestError('NOTICE_UNKNOWN', `no notice has id ${JSON.stringify(id)}`);
    // A refused notice was never acted on and never will be: as good as cancelled.
    if (rec.state === 'rejected' || rec.state === 'cancelled') return 'cancelled';
    if (rec.state !== 'accepted') return 'not-cancellable';
    rec.state = 'cancelled';
    rec.finishedAt = new Date(this.clock.now()).toISOString();
    this.budgets.delete(id);
    await this.notices.put(noticeKey(id), rec);
    this.evict();
    this.log.info({ noticeId: id }, 'notice cancelled before work started');
    return 'cancelled';
  }

  /** Stops taking new work; a notice in flight sees its signal abort. */
  /**
   * Stops taking work: a notice being carried out is left `running` in the journal for the
   * next start to resume (its done steps are not repeated), and one queued behind it is
   * not begun. Both settle with AGENT_STOPPING. See drain() for the ones finishing.
   */
  close(): void {
    this.stopping.abort(stoppingError());
  }

  /**
   * Waits (at most `timeoutMs`) for the notices whose outcome was complete before close()
   * to finish their bookkeeping: the outcome journaled, logged and handed to the client
   * (which sends it upstream). Without this a SIGTERM in that window exited between the
   * journal write and the rest (a CI run of the real-guest test).
   */
  async drain(timeoutMs = 5_000): Promise<void> {
    if (this.finishing.size === 0) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.allSettled([...this.finishing]),
      new Promise<void>((r) => (timer = setTimeout(r, timeoutMs))),
    ]);
    clearTimeout(timer);
  }

  /**
   * Runs `fn` in the notice queue: after every notice queued so far, before any queued
   * later, so no notice runs beside it (a reload changing the projects, agent/guest/reload.ts).
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.queue.then(fn);
    this.queue = p.catch(() => undefined);
    return p;
  }

  /** Waits for everything queued so far. */
  async idle(): Promise<void> {
    await this.queue.catch(() => undefined);
  }

  /** Every problem with the notice; `mismatch` when they are its allocation's (allocationProblems). */
  private async validate(
    notice: Notice,
    source: NoticeSource,
    deadlineMono: number,
  ): Promise<{ problems: Problem[]; mismatch: boolean }> {
    const problems: Problem[] = [];
    if (notice.guest !== this.broker.name)
      problems.push({
        field: 'guest',
        value: notice.guest,
        message: `this is ${JSON.stringify(this.broker.name)}, not ${JSON.stringify(notice.guest)}`,
      });
    if (source === 'upstream' && notice.seq <= this.lastSeqValue)
      problems.push({
        field: 'seq',
        value: notice.seq,
        message: `stale: notice seq ${notice.seq} is not after ${this.lastSeqValue}, already applied`,
      });
    const left = deadlineMono - this.clock.monotonic();
    if (Number.isNaN(Date.parse(notice.deadline)) || Number.isNaN(deadlineMono))
      problems.push({ field: 'deadline', value: notice.deadline, message: 'not a date' });
    // A reclaim that arrives after its deadline is stale: the broker above has given up on
    // it and given the resources back, so acting on it now would take what it no longer
    // asks for. A restore is not: the broker above raised the VM first and keeps the
    // restore on its books even when late, so carrying it out late is what makes the two
    // agree (docs/reliability.md, "A deadline shorter than a grace period").
    else if (left <= 0 && notice.kind === 'reclaim')
      problems.push({
        field: 'deadline',
        value: notice.deadline,
        message: `stale: the deadline passed ${Math.round(-left)} ms before the notice arrived; nothing done`,
      });
    else if (left > MAX_DEADLINE_AHEAD_MS)
      problems.push({
        field: 'deadline',
        value: notice.deadline,
        message: `more than ${MAX_DEADLINE_AHEAD_MS / 3_600_000} h away (docs/protocol.md, "Deadlines"); nothing done`,
      });
    if (problems.length === 0 && this.broker.allocation) {
      const mismatch = allocationProblems(notice, this.allocationBefore());
      if (mismatch.length > 0) return { problems: mismatch, mismatch: true };
    }
    if (problems.length === 0) problems.push(...(await this.broker.check(notice)));
    return { problems, mismatch: false };
  }

  /**
   * The allocation a new notice starts from: that of the last notice accepted and not yet
   * finished (they run one after another, and each leaves the allocation it carries), or
   * the broker's allocation now when none is pending.
   */
  allocationBefore(): Resources {
    let last: NoticeRecord | undefined;
    for (const r of this.records.values())
      if (
        (r.state === 'accepted' || r.state === 'running') &&
        (!last || r.receivedAt >= last.receivedAt)
      )
        last = r;
    if (last) return { ...last.notice.allocation };
    if (!this.broker.allocation) throw new NestError('INTERNAL', 'this broker keeps no allocation');
    return this.broker.allocation();
  }

  /** A notice record journaled, its fsync timed for the margin (EndMargin 'journal'). */
  private async put(rec: NoticeRecord): Promise<void> {
    const t0 = this.clock.monotonic();
    await this.notices.put(noticeKey(rec.notice.id), rec);
    this.margin.record('journal', this.clock.monotonic() - t0);
  }

  /**
   * The monotonic deadline of a pending notice and its budget: kept from receipt, or
   * restored once from the journal. A record from another boot gets this boot's deadline
   * (agent/common/clock.ts), journaled with it at its next write.
   */
  private deadlineOf(rec: NoticeRecord): { at: number; budgetMs: number } {
    let budgetMs = this.budgets.get(rec.notice.id);
    if (budgetMs === undefined || rec.deadlineMono === undefined) {
      rec.deadlineMono = restoreDeadline(rec, rec.notice.deadline, this.clock);
      rec.bootId = bootId();
      budgetMs = Math.max(0, rec.deadlineMono - this.clock.monotonic());
      this.budgets.set(rec.notice.id, budgetMs);
    }
    return { at: rec.deadlineMono, budgetMs };
  }

  /** Accepted or running, not yet finished. */
  pendingCount(): number {
    let n = 0;
    for (const r of this.records.values()) if (r.state === 'accepted' || r.state === 'running') n++;
    return n;
  }

  private noteSeq(rec: NoticeRecord): void {
    if (
      rec.source === 'upstream' &&
      rec.state !== 'rejected' &&
      rec.notice.seq > this.lastSeqValue
    ) {
      this.lastSeqValue = rec.notice.seq;
      this.lastSeqId = rec.notice.id;
    }
  }

  private enqueue(rec: NoticeRecord): Promise<Outcome> {
    const id = rec.notice.id;
    const p = this.queue.then(() => this.run(rec));
    this.queue = p.catch(() => undefined);
    this.inflight.set(id, p);
    const settled = (): void => {
      this.inflight.delete(id);
      this.evict();
    };
    p.then(settled, settled);
    return p;
  }

  private async run(rec: NoticeRecord): Promise<Outcome> {
    const { notice } = rec;
    const log = this.log.child({ noticeId: notice.id });
    // Queued behind one that was running when the agent began to stop: not begun at all
    // (runBroker would see the abort at once and record every step failed).
    if (this.stopping.signal.aborted) throw stoppingError();
    if (rec.state === 'cancelled')
      throw new NestError('NOTICE_UNKNOWN', `notice ${notice.id} was cancelled`);
    const resumed = rec.state === 'running';
    rec.state = 'running';
    rec.startedAt ??= new Date(this.clock.now()).toISOString();
    rec.runs += 1;
    await this.put(rec);
    // The steps end early enough for the kill, the journal writes and the outcome's send
    // to be over by the deadline (EndMargin: measured, the latest writes included).
    const { at, budgetMs } = this.deadlineOf(rec);
    const { killMs, afterMs } = this.margin.forBudget(budgetMs);
    log.info(
      { leftMs: Math.round(at - this.clock.monotonic()), killMs, afterMs },
      'the steps end before the deadline by the measured margin',
    );
    const key = noticeKey(notice.id);
    // One record for all the notice's steps, group-committed (broker.ts).
    const steps: StepJournal<unknown> = new NoticeStepJournal<unknown>(
      this.steps as unknown as StepStore<unknown>,
      `${key}--steps`,
    );
    log.info({ resumed, kind: notice.kind }, 'carrying out notice');
    const outcome = await this.broker.carryOut(notice, {
      signal: this.stopping.signal,
      log,
      resumed,
      steps,
      deadline: at - afterMs,
      killMs,
      clock: this.clock,
      margin: this.margin,
      onProgress: (ev) => this.emit('progress', notice.id, ev),
    });
    if (this.stopping.signal.aborted) {
      // Whatever the steps reported after the abort says "the agent was stopping", not what
      // happened to the projects: the record stays `running`, and the next start resumes
      // it from the step journal (steps done then are not repeated, the rest are carried
      // out). Recording it `done` would have reported the abort upstream as the outcome.
      log.info('agent stopping: outcome not recorded; the next start resumes this notice');
      throw stoppingError();
    }
    const finish = async (): Promise<Outcome> => {
      rec.state = 'done';
      rec.outcome = outcome;
      rec.finishedAt = new Date(this.clock.now()).toISOString();
      this.budgets.delete(notice.id);
      await this.put(rec);
      faultPoint('before-outcome');
      log.info({ status: outcome.status, freed: outcome.freed, ms: outcome.ms }, 'notice done');
      this.emit('outcome', outcome);
      return outcome;
    };
    const finishing = finish();
    this.finishing.add(finishing);
    try {
      return await finishing;
    } finally {
      this.finishing.delete(finishing);
    }
  }
}

/** CPUs compared in thousandths (the precision both ends round to: books.ts, operator.ts). */
const milli = (cpus: number): number => Math.round(cpus * 1000);

/**
 * A notice's allocation must be the allocation before it minus (reclaim) or plus
 * (restore) its change: host and guest then agree on what was taken after every notice.
 * Anything else (a restore that would lower the guest, a reclaim computed from stale
 * books) is refused with ALLOCATION_MISMATCH, before anything is journaled as accepted.
 *
 * One more is accepted: a reclaim to the allocation the guest has already. It asks
 * nothing of the projects (they fit it now), the VM is lowered to that allocation, never
 * below, and both ends then hold it. That is the reclaim a host re-applies after its
 * domain started again (docs/libvirt.md, "Books"): libvirt gave the VM its persistent
 * memory and the host's books followed, while the guest kept the reclaimed allocation
 * across its reboot (its journal). docs/protocol.md, "Seq and duplicates".
 */
export function allocationProblems(notice: Notice, before: Resources): Problem[] {
  if (
    notice.kind === 'reclaim' &&
    notice.allocation.memoryBytes === before.memoryBytes &&
    milli(notice.allocation.cpus) === milli(before.cpus)
  )
    return [];
  const sign = notice.kind === 'reclaim' ? -1 : 1;
  const want: Resources = {
    memoryBytes: before.memoryBytes + sign * notice.change.memoryBytes,
    cpus: (milli(before.cpus) + sign * milli(notice.change.cpus)) / 1000,
  };
  const verb = notice.kind === 'reclaim' ? 'minus' : 'plus';
  const problems: Problem[] = [];
  if (notice.allocation.memoryBytes !== want.memoryBytes)
    problems.push({
      field: 'allocation.memoryBytes',
      value: notice.allocation.memoryBytes,
      message: `the guest has ${before.memoryBytes} bytes; ${verb} the change of ${notice.change.memoryBytes} is ${want.memoryBytes}, not ${notice.allocation.memoryBytes}`,
    });
  if (milli(notice.allocation.cpus) !== milli(want.cpus))
    problems.push({
      field: 'allocation.cpus',
      value: notice.allocation.cpus,
      message: `the guest has ${before.cpus} CPUs; ${verb} the change of ${notice.change.cpus} is ${want.cpus}, not ${notice.allocation.cpus}`,
    });
  return problems;
}

function stoppingError(): NestError {
  return new NestError(
    'AGENT_STOPPING',
    'the agent is stopping; the next start resumes the notice',
  );
}
