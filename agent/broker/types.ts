/**
 * The notice and outcome types used at every level of the nesting (docs/architecture.md,
 * "Two roles at every level"): host → guest, guest → project, and a guest → a nested agent
 * one level deeper. Schemas that validate these at the boundary live in agent/protocol/.
 */

export interface Resources {
  cpus: number; // CPUs, may be fractional (0.5)
  memoryBytes: number;
}

export type NoticeKind = 'reclaim' | 'restore';

export interface Notice {
  id: string;
  /** Name of the child container (the guest) this notice is for. */
  guest: string;
  /** Ordered per guest; a notice with a lower seq than one already applied is stale. */
  seq: number;
  kind: NoticeKind;
  /** What goes away (reclaim) or comes back (restore). */
  change: Resources;
  /** The child's allocation once the notice is carried out. */
  allocation: Resources;
  /** ISO-8601; the resources go at this time whatever the child does. */
  deadline: string;
  reason: string;
  issuedAt: string;
}

export type ProjectAction = 'unchanged' | 'shrunk' | 'stopped' | 'grown' | 'started';

/**
 * How a stopped project ended (never a bare boolean: see CONTRIBUTING.md on kubelet).
 * `escaped`: the group emptied, but processes of the project were found alive outside it
 * (and killed): ProjectOutcome.escaped names them.
 */
export type ExitKind = 'graceful' | 'killed' | 'already-gone' | 'timeout' | 'escaped';

export interface ProjectLimits {
  memoryHigh: number | 'max';
  memoryMax: number | 'max';
  /** CPUs as a quota (cpu.max quota / period); 'max' for no quota. */
  cpuMax: number | 'max';
  cpuset?: string;
}

/** What a child gets before anything is taken from it (claim 1: "the second notice comprises the first"). */
export interface ProjectNotice {
  notice: Notice;
  project: string;
  action: ProjectAction;
  limits: ProjectLimits;
  gracePeriodMs: number;
  deadline: string;
  reason: string;
}

export interface ProjectOutcome {
  name: string;
  action: ProjectAction;
  before: ProjectLimits;
  after: ProjectLimits;
  exit: ExitKind | null;
  ms: number;
  reason: string;
  error?: { code: string; message: string };
  /** Pids of the project's processes found outside its group after the stop, killed. */
  escaped?: number[];
}

export type OutcomeStatus = 'complete' | 'partial' | 'failed';

export interface Outcome {
  noticeId: string;
  guest: string;
  status: OutcomeStatus;
  projects: ProjectOutcome[];
  /** What the child actually gave back (reclaim) or took (restore). */
  freed: Resources;
  startedAt: string;
  finishedAt: string;
  ms: number;
}
