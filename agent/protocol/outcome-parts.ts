/**
 * Outcomes larger than one line (with ~190+ projects the `outcome` was over the
 * 64 KiB cap, PROTOCOL_OVERSIZE, the host never heard it and the notice ended `late`).
 *
 * The sender (outcomeMessages) keeps an outcome that fits one line as it always was (an
 * older host reads it unchanged); a larger one goes as `outcome-part` messages, each a
 * slice of `projects` that fits a line, then the `outcome` summary with `projects: []`
 * and `parts: count`. The receiver (OutcomeAssembler) gathers the parts per notice and
 * rebuilds the whole outcome when the summary comes; a summary whose parts did not all
 * arrive (a reconnect in between, a rate limit) is refused, and the sender's usual resend
 * (the whole sequence again, from its journal) completes it later.
 *
 * Parts go only to a peer that listed the `outcome-parts` capability (docs/protocol.md,
 * "Versions and capabilities"). A peer without it gets one `outcome` line whatever the
 * size: when the whole would pass the cap, its `projects` are cut to what fits (those
 * acted on first), the rest of the outcome (status, freed, times) unchanged. That peer
 * would otherwise reject the parts and never hear the outcome at all; the full per-project
 * results stay in the guest's journal (`nestctl --guest notices`).
 */
import type { Outcome, ProjectOutcome } from '../broker/types';
import { MAX_LINE_BYTES, newMessageId, type OutcomeMsg, type OutcomePart } from './messages';
import { MAX_OUTCOME_PARTS, MAX_PROJECTS } from './schemas';

/** Room kept in a part's line for everything but the projects (type, ids, index, count). */
const PART_OVERHEAD = 512;

export interface OutcomeSendOptions {
  /** The receiver assembles parts (it listed `outcome-parts`). Default true. */
  parts?: boolean;
  maxLineBytes?: number;
}

/** The messages that carry one outcome, in sending order; every one fits the line cap. */
export function outcomeMessages(
  outcome: Outcome,
  opts: OutcomeSendOptions = {},
): (OutcomeMsg | OutcomePart)[] {
  const maxLineBytes = opts.maxLineBytes ?? MAX_LINE_BYTES;
  const whole: OutcomeMsg = { type: 'outcome', id: newMessageId(), outcome };
  if (Buffer.byteLength(JSON.stringify(whole)) + 1 <= maxLineBytes) return [whole];
  if (opts.parts === false) return [cutToFit(whole, maxLineBytes)];

  const budget = maxLineBytes - PART_OVERHEAD;
  const chunks: ProjectOutcome[][] = [];
  let chunk: ProjectOutcome[] = [];
  let size = 0;
  for (const p of outcome.projects) {
    const n = Buffer.byteLength(JSON.stringify(p)) + 1; // + the comma
    if (chunk.length > 0 && size + n > budget) {
      chunks.push(chunk);
      chunk = [];
      size = 0;
    }
    chunk.push(p);
    size += n;
  }
  if (chunk.length > 0) chunks.push(chunk);
  const count = chunks.length;
  const out: (OutcomeMsg | OutcomePart)[] = chunks.map((projects, index) => ({
    type: 'outcome-part',
    id: newMessageId(),
    noticeId: outcome.noticeId,
    index,
    count,
    projects,
  }));
  out.push({
    type: 'outcome',
    id: newMessageId(),
    outcome: { ...outcome, projects: [] },
    parts: count,
  });
  return out;
}

/**
 * One `outcome` line within the cap for a peer without parts: the projects acted on
 * (anything but `unchanged`, or with an error) first, in their order, then the others,
 * as many as fit.
 */
function cutToFit(whole: OutcomeMsg, maxLineBytes: number): OutcomeMsg {
  const all = whole.outcome.projects;
  const acted = (p: ProjectOutcome): boolean => p.action !== 'unchanged' || p.error !== undefined;
  const order = [...all.filter(acted), ...all.filter((p) => !acted(p))];
  const empty = { ...whole, outcome: { ...whole.outcome, projects: [] } };
  let size = Buffer.byteLength(JSON.stringify(empty)) + 1;
  const kept = new Set<ProjectOutcome>();
  for (const p of order) {
    const n = Buffer.byteLength(JSON.stringify(p)) + 1; // + the comma
    if (size + n > maxLineBytes) break;
    kept.add(p);
    size += n;
  }
  return { ...whole, outcome: { ...whole.outcome, projects: all.filter((p) => kept.has(p)) } };
}

export type Assembled =
  { ok: true; outcome: Outcome } | { ok: false; missing: number[]; count: number };

interface Assembly {
  count: number;
  parts: Map<number, ProjectOutcome[]>;
  projects: number;
}

/**
 * Gathers outcome parts per notice. Memory is bounded: at most `maxNotices` notices in
 * assembly (the oldest is dropped for a new one), each at most MAX_PROJECTS projects
 * (a part that would pass it is ignored). The caller decides which notices may send parts
 * (those it issued and has no outcome for) and calls clear() when the channel drops.
 */
export class OutcomeAssembler {
  private readonly pending = new Map<string, Assembly>();

  constructor(private readonly maxNotices = 16) {}

  /** Notices with parts held (for tests and status). */
  get holding(): number {
    return this.pending.size;
  }

  add(part: OutcomePart): void {
    let a = this.pending.get(part.noticeId);
    // A different count is a new send of the outcome (the first was cut short): start over.
    if (a && a.count !== part.count) {
      this.pending.delete(part.noticeId);
      a = undefined;
    }
    if (!a) {
      if (this.pending.size >= this.maxNotices) {
        const oldest = this.pending.keys().next().value as string;
        this.pending.delete(oldest);
      }
      a = { count: part.count, parts: new Map(), projects: 0 };
      this.pending.set(part.noticeId, a);
    }
    const before = a.parts.get(part.index)?.length ?? 0;
    if (a.projects - before + part.projects.length > MAX_PROJECTS) return;
    a.parts.set(part.index, part.projects);
    a.projects += part.projects.length - before;
  }

  /**
   * The whole outcome for a summary. A summary without `parts` is whole already. Parts are
   * kept when some are missing (a resend may fill the gap) and dropped once assembled.
   */
  complete(msg: OutcomeMsg): Assembled {
    if (msg.parts === undefined) return { ok: true, outcome: msg.outcome };
    const id = msg.outcome.noticeId;
    const a = this.pending.get(id);
    const count = Math.min(msg.parts, MAX_OUTCOME_PARTS);
    const missing: number[] = [];
    for (let i = 0; i < count; i++) if (!a || a.count !== count || !a.parts.has(i)) missing.push(i);
    if (missing.length > 0) return { ok: false, missing, count };
    const projects: ProjectOutcome[] = [];
    for (let i = 0; i < count; i++) projects.push(...a!.parts.get(i)!);
    this.pending.delete(id);
    return { ok: true, outcome: { ...msg.outcome, projects } };
  }

  forget(noticeId: string): void {
    this.pending.delete(noticeId);
  }

  clear(): void {
    this.pending.clear();
  }
}
