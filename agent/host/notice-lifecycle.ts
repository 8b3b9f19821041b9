/**
 * The lifecycle of one host notice (docs/architecture.md, "A notice, end to end"):
 *
 *   reclaim: send `notice` → ack → progress* → outcome (journaled) → actuate down → done
 *   restore: actuate up FIRST → send `restore` → outcome
 *   late:    no outcome by the deadline → GUEST_LATE; removed anyway only with force
 *
 * Delivery goes through the broker role (agent/broker/broker.ts: one step, one child: the
 * guest); the guest's answers arrive through agent/host/guest-connections.ts.
 */
import { runBroker, type ChildHandle, type StepJournal } from '../broker/broker';
import type { Notice, Outcome } from '../broker/types';
import { NestError, isNestError } from '../common/errors';
import type { Logger } from '../common/log';
import { newMessageId } from '../protocol/messages';
import type { GuestConfig } from './config';
import { faultPoint } from '../common/fault';
import { GuestConnections } from './guest-connections';
import { FINAL, type HostNoticeRecord } from './notice-store';

/** Runs each notice's lifecycle once, however often it is asked for. */
export abstract class NoticeLifecycle extends GuestConnections {
  protected readonly running = new Map<string, Promise<HostNoticeRecord>>();
  protected readonly aborts = new Map<string, AbortController>();

  protected track(rec: HostNoticeRecord): Promise<HostNoticeRecord> {
    const id = rec.notice.id;
    const existing = this.running.get(id);
    if (existing) return existing;
    const p = this.lifecycle(rec)
      .catch(async (err: unknown) => {
        this.log.error({ err, noticeId: id }, 'notice lifecycle failed');
        rec.error = errorOf(err);
        await this.store.save(rec).catch(() => undefined);
        return rec;
      })
      .finally(() => {
        this.running.delete(id);
        this.aborts.delete(id);
        // Before compact, which may fold it away (metrics read the whole record).
        if (FINAL.has(rec.state)) this.emit('finished', rec);
        this.store.compact(rec.notice.guest);
      });
    this.running.set(id, p);
    return p;
  }

  protected async lifecycle(rec: HostNoticeRecord): Promise<HostNoticeRecord> {
    const g = this.guest(rec.notice.guest);
    const log = this.log.child({ noticeId: rec.notice.id, guest: g.name });
    if (rec.notice.kind === 'restore' && !rec.actuation) {
      // Restore: the VM gets the resources BEFORE the guest is told it may use them.
      this.note(rec, 'actuating');
      rec.actuation = await this.deps.actuator.apply(g, rec.notice.allocation, 'up');
      rec.actuatedAt = new Date().toISOString();
      await this.store.save(rec);
      this.note(rec, 'actuated');
    }

    const outcome = await this.deliverAndWait(rec, g, log);

    if (rec.state === 'cancelled') return rec;
    if (rec.notice.kind === 'restore') {
      if (outcome) rec.state = 'done';
      else {
        rec.state = 'done';
        rec.late = true;
        rec.error ??= {
          code: 'GUEST_LATE',
          message: `guest "${g.name}" did not answer the restore by its deadline`,
        };
      }
      rec.finishedAt = new Date().toISOString();
      await this.store.save(rec);
      this.note(rec, rec.late ? 'late' : 'done');
      return rec;
    }

    // Reclaim.
    if (!outcome && rec.state === 'refused') {
      // The guest rejected it (onAck): its own error stands; it was not late.
      rec.finishedAt = new Date().toISOString();
      await this.store.save(rec);
      this.note(rec, 'refused');
      return rec;
    }
    if (!outcome) {
      rec.late = true;
      rec.error = {
        code: 'GUEST_LATE',
        message: `guest "${g.name}" sent no outcome by the deadline ${rec.notice.deadline}`,
      };
      if (!rec.force) {
        rec.state = 'late';
        rec.finishedAt = new Date().toISOString();
        await this.store.save(rec);
        this.note(rec, 'late');
        log.warn('guest late; nothing removed (no --force)');
        // Tell the guest we gave up, so a slow cascade does not go on for nothing.
        const link = this.links.get(g.name);
        if (link?.open)
          this.sendTo(link, { type: 'cancel', id: newMessageId(), noticeId: rec.notice.id });
        return rec;
      }
      log.warn('guest late; removing anyway (--force)');
    } else if (outcome.status === 'failed' && !rec.force) {
      rec.state = 'refused';
      rec.error = {
        code: 'NOTICE_REJECTED',
        message: `guest "${g.name}" reported that it could not free anything (status failed)`,
      };
      rec.finishedAt = new Date().toISOString();
      await this.store.save(rec);
      this.note(rec, 'refused');
      return rec;
    }

    // The outcome (or the forced deadline) is journaled: now, and only now, take it away.
    faultPoint('before-actuation');
    this.note(rec, 'actuating');
    rec.actuation = await this.deps.actuator.apply(g, rec.notice.allocation, 'down');
    rec.actuatedAt = new Date().toISOString();
    rec.state = 'done';
    rec.finishedAt = rec.actuatedAt;
    await this.store.save(rec);
    this.note(rec, 'actuated');
    return rec;
  }

  /** Delivers the notice through the broker role and waits for its outcome (undefined: none). */
  protected async deliverAndWait(
    rec: HostNoticeRecord,
    g: GuestConfig,
    log: Logger,
  ): Promise<Outcome | undefined> {
    if (rec.outcome) return rec.outcome;
    const ac = new AbortController();
    this.aborts.set(rec.notice.id, ac);
    const handle: ChildHandle<Notice, Outcome> = {
      name: g.name,
      deliver: async (notice) => {
        const link = this.links.get(g.name);
        if (!link?.open || !link.hello)
          throw new NestError(
            'GUEST_UNREACHABLE',
            `guest "${g.name}" is not connected; the notice is sent when it says hello`,
          );
        // The ack wait never runs past the deadline: a stopped guest is reported late at
        // its deadline, not a delivery timeout later.
        const left = Date.parse(notice.deadline) - Date.now();
        const ack = await this.request(
          link,
          notice.id,
          this.noticeMessage(notice),
          Math.max(1, Math.min(this.deps.deliverTimeoutMs ?? 5_000, left)),
        );
        this.onAck(rec, ack);
      },
      apply: (notice, ctx) =>
        new Promise<Outcome>((resolve, reject) => {
          if (rec.outcome) return resolve(rec.outcome);
          if (rec.state === 'refused')
            return reject(new NestError('NOTICE_REJECTED', rec.error?.message ?? 'refused'));
          const onAbort = (): void => {
            this.outcomeWaiters.delete(notice.id);
            reject(ctx.signal.reason);
          };
          if (ctx.signal.aborted) return onAbort();
          ctx.signal.addEventListener('abort', onAbort, { once: true });
          this.outcomeWaiters.set(notice.id, (o) => {
            ctx.signal.removeEventListener('abort', onAbort);
            this.outcomeWaiters.delete(notice.id);
            if (o instanceof NestError) reject(o);
            else resolve(o);
          });
        }),
    };
    const journal: StepJournal<Outcome> = {
      get: async () => ({ deliveredAt: rec.ackedAt, outcome: rec.outcome }),
      // The record is the journal: ack and outcome are saved as they arrive (onAck/onOutcome).
      put: async () => undefined,
    };
    try {
      await runBroker(
        [{ child: g.name, order: 0, notice: rec.notice }],
        new Map([[g.name, handle]]),
        {
          noticeId: rec.notice.id,
          deadline: new Date(rec.notice.deadline),
          signal: ac.signal,
          journal,
          log,
          overrunMs: 0,
          deliverTimeoutMs: this.deps.deliverTimeoutMs ?? 5_000,
          onProgress: (ev) => {
            if (ev.phase === 'notified') this.note(rec, 'delivered');
          },
          // A synthetic outcome is never journaled as the guest's: rec.outcome stays unset.
          failed: () => undefined as unknown as Outcome,
        },
      );
    } catch (err) {
      if (!isNestError(err)) throw err;
    }
    return rec.outcome;
  }
}

function errorOf(err: unknown): { code: string; message: string } {
  if (isNestError(err)) return { code: err.code, message: err.message };
  return { code: 'INTERNAL', message: err instanceof Error ? err.message : String(err) };
}
