/**
 * The notice and outcome types used at every level of the nesting (docs/architecture.md,
 * "Two roles at every level"): host → guest, guest → project, and a guest → a nested agent
 * one level deeper. The wire types are `z.infer` of the zod schemas that validate them at
 * the boundary (agent/protocol/schemas.ts; their fields are specified in docs/protocol.md):
 * one source, not two copies held equal.
 */
import type { z } from 'zod';
import type * as S from '../protocol/schemas';
import type * as PS from '../protocol/project-schemas';

/** CPUs (may be fractional, 0.5) and bytes of memory. */
export type Resources = z.infer<typeof S.ResourcesSchema>;

export type NoticeKind = Notice['kind'];

/**
 * A notice to a child container (the guest): `seq` ordered per guest (a notice with a seq
 * not after one already applied is stale), `change` what goes away (reclaim) or comes back
 * (restore), `allocation` the child's allocation once carried out, `deadline` (ISO-8601)
 * when the resources go whatever the child does.
 */
export type Notice = z.infer<typeof S.NoticeSchema>;

export type ProjectAction = ProjectOutcome['action'];

/**
 * How a stopped project ended (never a bare boolean: see CONTRIBUTING.md on kubelet).
 * `escaped`: the group emptied, but processes of the project were found alive outside it
 * (and killed): ProjectOutcome.escaped names them.
 */
export type ExitKind = NonNullable<ProjectOutcome['exit']>;

/** memory.high, memory.max, CPUs as a quota (cpu.max quota / period), 'max' for none. */
export type ProjectLimits = z.infer<typeof S.ProjectLimitsSchema>;

/**
 * What a project gets before anything is taken from it (claim 1: "the second notice
 * comprises the first"): docs/project-protocol.md.
 */
export type ProjectNotice = PS.ProjectNotice;

export type ProjectOutcome = z.infer<typeof S.ProjectOutcomeSchema>;

export type OutcomeStatus = Outcome['status'];

/** A notice's result; `freed` is what the child actually gave back (reclaim) or took (restore). */
export type Outcome = z.infer<typeof S.OutcomeSchema>;
