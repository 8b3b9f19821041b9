/**
 * The guest's dry run as the host asks for it over the channel (`plan` → `plan-result`,
 * agent/protocol/messages.ts): the planner's decisions for an allocation, in short, in
 * one line of at most 64 KiB (framing.ts). A plan over many projects that would not fit
 * leaves out the last decisions (in execution order: the unchanged ones come last) and
 * says how many.
 */
import type { Resources } from '../broker/types';
import { MAX_LINE_BYTES, type PlanProject, type PlanResult } from '../protocol/messages';
import type { Plan } from './planner';

/** Room for the envelope (type, ids, allocations, reasons) beside the projects. */
const ENVELOPE_BYTES = 8 * 1024;

export function planResultBody(
  plan: Plan,
  allocation: Resources,
  priorityOf: (project: string) => number,
  maxBytes = MAX_LINE_BYTES,
): Omit<PlanResult, 'type' | 'id' | 'replyTo'> {
  const reasons = plan.reasons.slice(0, 100).map((r) => r.slice(0, 1024));
  const projects: PlanProject[] = [];
  let room = maxBytes - ENVELOPE_BYTES - reasons.reduce((n, r) => n + Buffer.byteLength(r) + 3, 0);
  for (const d of plan.decisions) {
    const p: PlanProject = {
      project: d.project,
      priority: priorityOf(d.project),
      action: d.action,
      before: d.before,
      after: d.after,
      reason: d.reason.slice(0, 1024),
    };
    if (d.mustComeDownFrom !== undefined) p.mustComeDownFrom = d.mustComeDownFrom;
    const size = Buffer.byteLength(JSON.stringify(p)) + 1;
    if (size > room) break;
    room -= size;
    projects.push(p);
  }
  const out: Omit<PlanResult, 'type' | 'id' | 'replyTo'> = {
    allocation,
    projectAllocation: plan.allocation,
    fits: plan.fits,
    reasons,
    projects,
  };
  if (projects.length < plan.decisions.length)
    out.omitted = plan.decisions.length - projects.length;
  return out;
}
