/**
 * Messages on the host↔guest channel (and between a guest and a nested agent).
 * Newline-delimited JSON, one message a line, ≤ 64 KiB (framing.ts). Every message
 * has a `type` and a message `id`; replies name the message they answer in `replyTo`.
 * The zod schemas that validate these at the boundary are in schemas.ts and must stay
 * in step with these types (a test checks it).
 *
 * Flow: hello → welcome; notice|restore → ack → progress* → outcome-part* → outcome;
 * cancel → ack;
 * plan → plan-result (a dry run: the guest's plan for an allocation; nothing changes);
 * ping → pong; anything invalid → error (the connection and all state stay).
 * Only resource targets cross the channel: nothing in a message is ever executed.
 */
import { randomUUID } from 'node:crypto';
import type {
  Notice,
  Outcome,
  ProjectAction,
  ExitKind,
  ProjectLimits,
  ProjectOutcome,
  Resources,
} from '../broker/types';

export const PROTOCOL_VERSION = 1;
export const MAX_LINE_BYTES = 64 * 1024;
/** A 0xFF byte discards any partial line (qemu-guest-agent's guest-sync-delimited). */
export const RESYNC_BYTE = 0xff;

export interface InventoryProject {
  name: string;
  priority: number;
  state: 'running' | 'stopped' | 'starting' | 'stopping' | 'failed';
}

export interface Hello {
  type: 'hello';
  id: string;
  version: number;
  guest: string;
  inventory: { cpus: number; memoryBytes: number; projects: InventoryProject[] };
  /** Highest notice seq this guest has applied (from its journal), or 0. */
  lastSeq: number;
}

export interface Welcome {
  type: 'welcome';
  id: string;
  replyTo: string;
  version: number;
  guest: string;
  heartbeatMs: number;
}

export interface NoticeMsg {
  type: 'notice';
  id: string;
  notice: Notice; // kind 'reclaim'
}

export interface RestoreMsg {
  type: 'restore';
  id: string;
  notice: Notice; // kind 'restore'
}

export interface Ack {
  type: 'ack';
  id: string;
  replyTo: string;
  noticeId: string;
  /** accepted: new; duplicate: already known (the outcome follows from the journal); rejected: see error. */
  state: 'accepted' | 'duplicate' | 'rejected' | 'cancelled' | 'not-cancellable';
  error?: { code: string; message: string };
}

export interface Progress {
  type: 'progress';
  id: string;
  noticeId: string;
  project: string;
  phase: 'notified' | 'shrunk' | 'stopping' | 'stopped' | 'started' | 'grown';
  action: ProjectAction;
  exit?: ExitKind | null;
  ms: number;
}

export interface OutcomeMsg {
  type: 'outcome';
  id: string;
  /**
   * With `parts`, `outcome.projects` is empty: the per-project results came just before,
   * in `parts` outcome-part messages (outcome-parts.ts), and the receiver assembles them.
   * Without it (an outcome that fits one line, or an older peer) the outcome is whole.
   */
  outcome: Outcome;
  parts?: number;
}

/**
 * One chunk of an outcome's per-project results, for an outcome too large for one line
 * (≈ 340 bytes a project: more than ~190 projects overflow MAX_LINE_BYTES). Parts
 * 0 … count-1 precede the `outcome` message that names `parts: count`.
 */
export interface OutcomePart {
  type: 'outcome-part';
  id: string;
  noticeId: string;
  index: number;
  count: number;
  projects: ProjectOutcome[];
}

export interface Cancel {
  type: 'cancel';
  id: string;
  noticeId: string;
}

/**
 * The host asks for the guest's dry run (`nestctl plan VM` on the host): what the guest's
 * planner would do to each project at `allocation` (the guest's whole allocation after the
 * change). Nothing is journaled, nothing changes; the answer is a `plan-result` (or an
 * `error` naming this message in `replyTo`).
 */
export interface PlanRequest {
  type: 'plan';
  id: string;
  kind: 'reclaim' | 'restore';
  allocation: Resources;
}

/** One project's decision in a `plan-result` (the guest planner's Decision, in short). */
export interface PlanProject {
  project: string;
  priority: number;
  action: ProjectAction;
  before: ProjectLimits;
  after: ProjectLimits;
  /** Usage (bytes) that must come down before memory.max can be lowered. */
  mustComeDownFrom?: number;
  reason: string;
}

export interface PlanResult {
  type: 'plan-result';
  id: string;
  replyTo: string;
  /** The guest's allocation planned for, and what of it the projects share (less the reserve). */
  allocation: Resources;
  projectAllocation: Resources;
  /** Every running project keeps running. */
  fits: boolean;
  reasons: string[];
  /** In execution order. */
  projects: PlanProject[];
  /** Projects left out to keep the line under 64 KiB (the last, least affected, first). */
  omitted?: number;
}

export interface Ping {
  type: 'ping';
  id: string;
  t: number;
}

export interface Pong {
  type: 'pong';
  id: string;
  replyTo: string;
  t: number;
}

export interface ErrorMsg {
  type: 'error';
  id: string;
  replyTo?: string;
  code: string;
  message: string;
  problems?: { field: string; message: string }[];
}

export type Message =
  | Hello
  | Welcome
  | NoticeMsg
  | RestoreMsg
  | Ack
  | Progress
  | OutcomeMsg
  | OutcomePart
  | Cancel
  | PlanRequest
  | PlanResult
  | Ping
  | Pong
  | ErrorMsg;

export type MessageType = Message['type'];

/** A fresh message id (a UUID fits the id pattern of schemas.ts). */
export function newMessageId(): string {
  return randomUUID();
}
