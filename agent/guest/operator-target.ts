/**
 * What the guest's operator API (agent/guest/operator.ts) needs of the running agent, and
 * the shapes it answers with. GuestAgent (agent/guest/agent.ts) implements it and registers
 * the API; the API knows the agent only through this interface, so neither module imports
 * the other both ways.
 */
import type { ProcessRow } from '../../cgroup-adapter/host-usage';
import type { ProjectLimits, Resources } from '../broker/types';
import type { NoticeBook } from '../client/notices';
import type { GuestConfig } from './config';
import type { GuestBroker } from './executor';
import type { Supervisor } from './supervisor';

export interface OperatorTarget {
  readonly cfg: Pick<GuestConfig, 'guest'>;
  /** The notice book: local notices go in here, like the host's. */
  readonly book: Pick<NoticeBook, 'allocationBefore' | 'submit' | 'list' | 'cancel' | 'on' | 'off'>;
  /** `plan`: the dry run. */
  readonly broker: Pick<GuestBroker, 'planFor'>;
  /** `stop` / `start` of one project by an operator (agent/guest/supervisor.ts). */
  readonly supervisor: Pick<Supervisor, 'operatorStop' | 'operatorStart'>;
  status(): object;
  projectRows(): Promise<object[]>;
  top(opts?: { processes?: boolean }): Promise<TopView>;
  /** Set by the daemon (agent/guest/main.ts): re-reads its config file (`nestctl --guest reload`). */
  reload?: (trigger: string) => Promise<unknown>;
}

/** One project in `top`: null where the kernel file could not be read (a group just gone). */
export interface TopRow {
  name: string;
  priority: number;
  state: string;
  limits: ProjectLimits;
  memoryBytes: number | null;
  memoryPeakBytes: number | null;
  oomKills: number | null;
  /** memory / cpu pressure, `some` avg10 (%), where the kernel has PSI. */
  memoryPressure10: number | null;
  cpuPressure10: number | null;
  /** CPUs in use over the sampler's last interval. */
  cpus: number | null;
  throttledUs: number | null;
  pids: number | null;
  /** With `top --processes`: the project's processes, largest RSS first. */
  processes?: ProcessRow[];
}

export interface TopView {
  guest: string;
  at: string;
  allocation: Resources;
  projectAllocation: Resources;
  projects: TopRow[];
}
