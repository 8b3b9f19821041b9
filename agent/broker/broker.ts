/**
 * The broker role (docs/architecture.md, "Two roles at every level"): a broker serves
 * the containers inside its own. Given the steps of a plan and a handle on each child, it
 *
 *   1. delivers every affected child its notice BEFORE anything is taken from any child
 *      (US 8,181,182 claim 1: the second notice, comprising the first, reaches the
 *      inner container before its resources are deallocated);
 *   2. carries the steps out in order: steps that share an `order` run in parallel
 *      (they are independent), groups run one after the other (lowest priority first);
 *   3. bounds everything by the notice deadline (each child gets an AbortSignal that
 *      fires at the deadline, and a step that overruns it by `overrunMs` is recorded as
 *      failed with TIMEOUT);
 *   4. journals each child's delivery and outcome, so a broker restarted in the middle
 *      of a notice delivers and acts once per child (idempotent per step).
 *
 * The child notice and child outcome are type parameters: the guest agent's children are
 * projects (ProjectNotice → ProjectOutcome); the host broker's children are guests
 * (Notice → Outcome), and a project may itself be another agent one level deeper.
 */
import type { Logger } from '../common/log';
import { withTimeout } from '../common/timeout';
import { fromWall, systemClock, type Clock } from '../common/clock';
import type { Outcome, OutcomeStatus, ProjectOutcome, Resources, Notice } from './types';

/** One child's part of a plan. */
export interface BrokerStep<CN> {
  child: string;
  /** Steps with the same order run together; lower orders first. */
  order: number;
  notice: CN;
  /** False for children that only need to be told (nothing taken, nothing given): delivered, not applied. */
  act?: boolean;
}

export interface ChildProgress {
  child: string;
  phase: string;
  [k: string]: unknown;
}

export interface ChildContext {
  /** Fires at the notice deadline or when the broker is stopped. */
  signal: AbortSignal;
  /** The deadline as wall time: for messages and logs only. */
  deadline: Date;
  /** The deadline on the run's clock (Clock.monotonic): what every wait is bounded by. */
  deadlineMono: number;
  clock: Clock;
  log: Logger;
  /** True when this step was started by an earlier run of the broker that did not finish it. */
  resumed: boolean;
  progress(ev: { phase: string; [k: string]: unknown }): void;
}

export interface ChildHandle<CN, CO> {
  readonly name: string;
  /** Tells the child what is coming. Takes nothing. Must be quick and safe to repeat. */
  deliver(notice: CN, ctx: ChildContext): Promise<void>;
  /** Carries the child's step out and says how it went. Must honour ctx.signal. */
  apply(notice: CN, ctx: ChildContext): Promise<CO>;
}

/** Durable record of each child's step of one notice (see StepJournalRecord). */
export interface StepJournal<CO> {
  get(child: string): Promise<StepJournalRecord<CO> | undefined>;
  put(child: string, rec: StepJournalRecord<CO>): Promise<void>;
}

export interface StepJournalRecord<CO> {
  deliveredAt?: string;
  startedAt?: string;
  outcome?: CO;
}

/** Where NoticeStepJournal keeps its one record per notice. */
export interface StepStore<CO> {
  get(key: string): Promise<Record<string, StepJournalRecord<CO>> | undefined>;
  put(key: string, value: Record<string, StepJournalRecord<CO>>): Promise<void>;
}

/**
 * Every child's step record of one notice in ONE journal record (`<key>--steps`), so the
 * steps of a phase that end together are made durable by one write (docs/performance.md: a
 * record a child and step cost an fsync each, ~10 a project). The store's group commit
 * (Journal) merges the puts that arrive while a write is on the disk; each put still
 * resolves only once a write holding it is durable, so "journaled before acting" holds per
 * child.
 */
export class NoticeStepJournal<CO> implements StepJournal<CO> {
  private recs: Record<string, StepJournalRecord<CO>> | undefined;
  private loading: Promise<void> | undefined;

  constructor(
    private readonly store: StepStore<CO>,
    private readonly key: string,
  ) {}

  private load(): Promise<void> {
    this.loading ??= this.store.get(this.key).then((v) => {
      this.recs = v ?? {};
    });
    return this.loading;
  }

  async get(child: string): Promise<StepJournalRecord<CO> | undefined> {
    await this.load();
    return this.recs![child];
  }

  async put(child: string, rec: StepJournalRecord<CO>): Promise<void> {
    await this.load();
    this.recs![child] = rec;
    await this.store.put(this.key, this.recs!);
  }
}

export interface StepResult<CO> {
  child: string;
  order: number;
  outcome: CO;
  /** The outcome came from the journal: an earlier run had already finished this step. */
  fromJournal: boolean;
}

export interface BrokerRunOptions<CN, CO> {
  noticeId: string;
  /** The deadline's wall form (messages, logs). */
  deadline: Date;
  /**
   * The deadline on `clock.monotonic()`, converted once where the notice arrived. Without
   * it the wall form is converted here, once, at the start of the run.
   */
  deadlineMono?: number;
  /** An outside abort (the agent shutting down). The deadline is added to it. */
  signal?: AbortSignal;
  journal?: StepJournal<CO>;
  log: Logger;
  onProgress?: (ev: ChildProgress) => void;
  /** Builds the outcome recorded for a step whose child threw, or overran the deadline. */
  failed(step: BrokerStep<CN>, err: unknown, ms: number): CO;
  /** How long past the deadline a step may run before it is recorded as failed. */
  overrunMs?: number;
  /** Bound on each delivery, so one stuck child cannot hold back everyone else's notice. */
  deliverTimeoutMs?: number;
  /**
   * Awaited after the deliveries and before any step acts (the caller's own record, such
   * as the plan, written meanwhile); a rejection ends the run with nothing taken.
   */
  ready?: Promise<unknown>;
  clock?: Clock;
}

export class BrokerTimeout extends Error {
  readonly code = 'TIMEOUT';
}

/** Runs one notice's steps over the children. Returns one result per acting step, in step order. */
export async function runBroker<CN, CO>(
  steps: BrokerStep<CN>[],
  children: ReadonlyMap<string, ChildHandle<CN, CO>>,
  opts: BrokerRunOptions<CN, CO>,
): Promise<StepResult<CO>[]> {
  const clock = opts.clock ?? systemClock;
  const now = (): number => clock.monotonic();
  const deadlineMono = opts.deadlineMono ?? fromWall(opts.deadline, clock);
  const log = opts.log.child({ noticeId: opts.noticeId });
  const overrunMs = opts.overrunMs ?? 10_000;
  const deliverTimeoutMs = opts.deliverTimeoutMs ?? 5_000;
  for (const s of steps) {
    if (!children.has(s.child))
      throw new Error(`broker step for unknown child ${JSON.stringify(s.child)}`);
  }

  // One signal for everything: the deadline or the outside abort, whichever comes first.
  const ac = new AbortController();
  const timerOff = new AbortController();
  void clock.sleep(Math.max(0, deadlineMono - now()), timerOff.signal).then(() => {
    if (!timerOff.signal.aborted)
      ac.abort(new BrokerTimeout(`deadline ${opts.deadline.toISOString()} passed`));
  });
  const onOutside = (): void => ac.abort(opts.signal?.reason);
  if (opts.signal?.aborted) onOutside();
  opts.signal?.addEventListener('abort', onOutside, { once: true });

  const ctxFor = (child: string, resumed: boolean): ChildContext => ({
    signal: ac.signal,
    deadline: opts.deadline,
    deadlineMono,
    clock,
    log: log.child({ child }),
    resumed,
    progress: (ev) => opts.onProgress?.({ ...ev, child }),
  });
  const records = new Map<string, StepJournalRecord<CO>>();
  const save = async (child: string, patch: StepJournalRecord<CO>): Promise<void> => {
    const rec = { ...(records.get(child) ?? {}), ...patch };
    records.set(child, rec);
    await opts.journal?.put(child, rec);
  };

  // The steps an earlier run had begun: `resumed` is theirs alone, whatever this run records.
  const begunBefore = new Set<string>();
  try {
    for (const s of steps) {
      const rec = await opts.journal?.get(s.child);
      if (rec) records.set(s.child, rec);
      if (rec?.startedAt !== undefined) begunBefore.add(s.child);
    }
    // The first group acts as soon as every child has its notice: its steps' startedAt is
    // recorded with their delivery, in the same journal write, so that one durable write
    // (not two in a row) stands between the notices and the first act. Later groups
    // record theirs when they begin (docs/performance.md, "Phase profile of the goals missed").
    const acting0 = steps.filter((s) => s.act !== false);
    const firstOrder = acting0.length > 0 ? Math.min(...acting0.map((s) => s.order)) : undefined;
    const startsAtOnce = (s: BrokerStep<CN>): boolean => s.act !== false && s.order === firstOrder;
    /** Steps whose startedAt this run has on the disk (a write that failed does not count). */
    const startDurable = new Set<string>(begunBefore);

    // 1. Every child hears of the notice before anything is taken from any of them.
    await Promise.all(
      steps.map(async (s) => {
        const rec = records.get(s.child);
        if (rec?.deliveredAt || rec?.outcome) return;
        const child = children.get(s.child)!;
        const t0 = now();
        try {
          await bounded(
            child.deliver(s.notice, ctxFor(s.child, false)),
            deliverTimeoutMs,
            `delivering the notice to ${s.child}`,
          );
          const at = new Date(clock.now()).toISOString();
          const begins = startsAtOnce(s) && rec?.startedAt === undefined;
          await save(s.child, { deliveredAt: at, ...(begins ? { startedAt: at } : {}) });
          if (begins) startDurable.add(s.child);
          opts.onProgress?.({
            child: s.child,
            phase: 'notified',
            ms: now() - t0,
            action: actionOf(s.notice),
          });
        } catch (err) {
          // The resources go at the deadline whatever happens: a failed delivery is
          // logged and the step still runs (the child's stop path does not depend on it).
          log.warn({ err, child: s.child }, 'could not deliver the notice to a child');
        }
      }),
    );

    log.debug({ phase: 'delivered' }, 'notice phase');
    if (opts.ready) await opts.ready;
    log.debug({ phase: 'acting' }, 'notice phase');

    // 2. The steps, group by group.
    const acting = steps.filter((s) => s.act !== false);
    const orders = [...new Set(acting.map((s) => s.order))].sort((a, b) => a - b);
    const results = new Map<string, StepResult<CO>>();
    for (const order of orders) {
      const group = acting.filter((s) => s.order === order);
      await Promise.all(
        group.map(async (s) => {
          const rec = records.get(s.child);
          if (rec?.outcome !== undefined) {
            log.info({ child: s.child }, 'step already done before a restart; not repeated');
            results.set(s.child, {
              child: s.child,
              order,
              outcome: rec.outcome,
              fromJournal: true,
            });
            return;
          }
          const resumed = begunBefore.has(s.child);
          // Durable with the delivery (the first group), or now: a step whose delivery or
          // its record failed writes it here, before it acts, all the same.
          if (!startDurable.has(s.child))
            await save(s.child, {
              startedAt: rec?.startedAt ?? new Date(clock.now()).toISOString(),
            });
          const t0 = now();
          let outcome: CO;
          try {
            outcome = await bounded(
              children.get(s.child)!.apply(s.notice, ctxFor(s.child, resumed)),
              Math.max(0, deadlineMono - now()) + overrunMs,
              `step of ${s.child} (deadline ${opts.deadline.toISOString()} + ${overrunMs} ms)`,
            );
          } catch (err) {
            log.error({ err, child: s.child }, 'child step failed');
            outcome = opts.failed(s, err, now() - t0);
          }
          await save(s.child, { outcome });
          results.set(s.child, { child: s.child, order, outcome, fromJournal: false });
        }),
      );
    }
    log.debug({ phase: 'steps-done' }, 'notice phase');
    return acting.map((s) => results.get(s.child)!);
  } finally {
    timerOff.abort();
    opts.signal?.removeEventListener('abort', onOutside);
  }
}

/** A child notice's action, when it has one (ProjectNotice does), for progress events. */
function actionOf(n: unknown): unknown {
  return n !== null && typeof n === 'object' && 'action' in n
    ? (n as { action: unknown }).action
    : undefined;
}

/** withTimeout with the broker's error: `what` did not finish in time. */
function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return withTimeout(p, ms, () => new BrokerTimeout(`${what} did not finish in time`));
}

/** Limits as numbers for totals: 'max' counts as the whole of `whole`. */
function num(v: number | 'max', whole: number): number {
  return v === 'max' ? whole : v;
}

/**
 * The outcome a broker of projects reports upward: per project what happened, the totals
 * and a status: complete (every step as planned), partial (some step failed or ran out of
 * time), failed (nothing went as planned).
 *
 * Totals: what the projects held before and after, each side capped by the allocation it
 * lived in (limits may add up to more than the allocation: a limit is a ceiling, not a
 * reservation). A reclaim reports the drop (what was given back), a restore the rise
 * (what was taken); both ≥ 0. A project `started` held nothing before.
 */
export function summariseProjects(
  notice: Notice,
  projects: ProjectOutcome[],
  previous: Resources,
  startedAt: Date,
  finishedAt: Date,
  next: Resources = previous,
  /** How long it took, on the monotonic clock; the two wall times are for display only. */
  ms: number = finishedAt.getTime() - startedAt.getTime(),
): Outcome {
  let memBefore = 0;
  let memAfter = 0;
  let cpuBefore = 0;
  let cpuAfter = 0;
  for (const p of projects) {
    if (p.action !== 'started') {
      memBefore += num(p.before.memoryMax, previous.memoryBytes);
      cpuBefore += num(p.before.cpuMax, previous.cpus);
    }
    memAfter += num(p.after.memoryMax, next.memoryBytes);
    cpuAfter += num(p.after.cpuMax, next.cpus);
  }
  memBefore = Math.min(memBefore, previous.memoryBytes);
  cpuBefore = Math.min(cpuBefore, previous.cpus);
  memAfter = Math.min(memAfter, next.memoryBytes);
  cpuAfter = Math.min(cpuAfter, next.cpus);
  const sign = notice.kind === 'restore' ? -1 : 1;
  const memory = sign * (memBefore - memAfter);
  const cpus = sign * (cpuBefore - cpuAfter);
  const failures = projects.filter((p) => p.error !== undefined).length;
  let status: OutcomeStatus = 'complete';
  if (failures > 0) status = failures === projects.length ? 'failed' : 'partial';
  return {
    noticeId: notice.id,
    guest: notice.guest,
    status,
    projects,
    freed: {
      memoryBytes: Math.max(0, memory),
      cpus: Math.max(0, Math.round(cpus * 1000) / 1000),
    },
    startedAt: startedAt.toISOString(),
    finishedAt: finishedAt.toISOString(),
    ms: Math.max(0, Math.round(ms)),
  };
}
