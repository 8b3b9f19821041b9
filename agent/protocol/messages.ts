/**
 * Messages on the host↔guest channel (and between a guest and a nested agent), specified
 * in docs/protocol.md. Newline-delimited JSON, one message a line, ≤ 64 KiB (framing.ts).
 * Every message has a `type` and a message `id`; replies name the message they answer in
 * `replyTo`.
 *
 * The types here are `z.infer` of the zod schemas in schemas.ts, which validate every
 * message at the boundary: one source, so a field cannot be added to one and not the other.
 *
 * Flow: hello → welcome; notice|restore → ack → progress* → outcome-part* → outcome;
 * cancel → ack;
 * plan → plan-result (a dry run: the guest's plan for an allocation; nothing changes);
 * ping → pong; facts (guest → host, unasked, when its online CPUs or MemTotal change);
 * anything invalid → error (the connection and all state stay).
 * Only resource targets cross the channel: nothing in a message is ever executed.
 */
import { randomUUID } from 'node:crypto';
import type { z } from 'zod';
import type * as S from './schemas';

/**
 * The protocol version (docs/protocol.md, "Versions and capabilities"). It changes only for
 * a change an older peer cannot follow; optional features are capabilities instead.
 */
export const PROTOCOL_VERSION = 1;
export const MAX_LINE_BYTES = 64 * 1024;
/** A 0xFF byte discards any partial line (qemu-guest-agent's guest-sync-delimited). */
export const RESYNC_BYTE = 0xff;

/**
 * The receiver assembles `outcome-part` messages (outcome-parts.ts): a sender splits an
 * outcome over the line cap into parts only for a peer that listed this.
 */
export const CAP_OUTCOME_PARTS = 'outcome-parts';
/**
 * Deadlines on the host's monotonic clock (docs/protocol.md, "Deadlines"): a guest that
 * lists it takes `clock` on `welcome`, `notice` and `restore`; a host that lists it sends
 * them (to a guest that listed it) and pings on that clock.
 */
export const CAP_MONOTONIC_CLOCK = 'monotonic-clock';
/**
 * Real CPU removal (docs/protocol.md, "Versions and capabilities"). Listed by a guest: it
 * takes `leavingCpus` in a reclaim and moves its projects off them first. Listed by a host:
 * it takes `onlineCpus` and `memTotal` on an outcome, and the `facts` message.
 */
export const CAP_CPU_UNPLUG = 'cpu-unplug';
/** What this implementation lists in its `hello` (guest) and `welcome` (host). */
export const CAPABILITIES: readonly string[] = Object.freeze([
  CAP_OUTCOME_PARTS,
  CAP_MONOTONIC_CLOCK,
  CAP_CPU_UNPLUG,
]);
/**
 * Listed by a guest that answers `plan` with `plan-result` (the host's `nestctl plan VM`):
 * a host sends `plan` only to a guest that listed it. Not in CAPABILITIES: only a client
 * with a planner behind it lists it (agent/client/client.ts).
 */
export const CAP_PLAN = 'plan';

export type InventoryProject = z.infer<typeof S.InventoryProjectSchema>;
export type Hello = z.infer<typeof S.HelloSchema>;
export type Welcome = z.infer<typeof S.WelcomeSchema>;
/** A `notice` message carries a notice of kind 'reclaim'. */
export type NoticeMsg = z.infer<typeof S.NoticeMsgSchema>;
/** A `restore` message carries a notice of kind 'restore'. */
export type RestoreMsg = z.infer<typeof S.RestoreMsgSchema>;
/** The sender's monotonic clock on a notice: its reading at send and the deadline on it. */
export type SenderClock = z.infer<typeof S.SenderClockSchema>;
/**
 * accepted: new; duplicate: already known (the outcome follows from the journal);
 * rejected: see error; cancelled / not-cancellable: the answer to a cancel.
 */
export type Ack = z.infer<typeof S.AckSchema>;
export type Progress = z.infer<typeof S.ProgressSchema>;
/**
 * With `parts`, `outcome.projects` is empty: the per-project results came just before,
 * in `parts` outcome-part messages (outcome-parts.ts), and the receiver assembles them.
 * Without it (an outcome that fits one line, or a peer without `outcome-parts`) the
 * outcome is whole.
 */
export type OutcomeMsg = z.infer<typeof S.OutcomeMsgSchema>;
/** The guest's online CPUs and MemTotal, sent when they change (docs/protocol.md, "facts (guest → host)"). */
export type FactsMsg = z.infer<typeof S.FactsMsgSchema>;
/**
 * One chunk of an outcome's per-project results, for an outcome too large for one line
 * (≈ 340 bytes a project: more than ~190 projects overflow MAX_LINE_BYTES). Parts
 * 0 … count-1 precede the `outcome` message that names `parts: count`.
 */
export type OutcomePart = z.infer<typeof S.OutcomePartSchema>;
export type Cancel = z.infer<typeof S.CancelSchema>;
/**
 * The host asks for the guest's dry run (`nestctl plan VM` on the host): what the guest's
 * planner would do to each project at `allocation` (the guest's whole allocation after the
 * change). Nothing is journaled, nothing changes; the answer is a `plan-result` (or an
 * `error` naming this message in `replyTo`).
 */
export type PlanRequest = z.infer<typeof S.PlanRequestSchema>;
/** One project's decision in a `plan-result` (the guest planner's Decision, in short). */
export type PlanProject = z.infer<typeof S.PlanProjectSchema>;
/**
 * The guest's plan, in execution order; `omitted` counts the decisions left out to keep
 * the line under 64 KiB (the last, least affected, first).
 */
export type PlanResult = z.infer<typeof S.PlanResultSchema>;
export type Ping = z.infer<typeof S.PingSchema>;
export type Pong = z.infer<typeof S.PongSchema>;
export type ErrorMsg = z.infer<typeof S.ErrorMsgSchema>;
export type Message = z.infer<typeof S.MessageSchema>;
export type MessageType = Message['type'];

/** A fresh message id (a UUID fits the id pattern of schemas.ts). */
export function newMessageId(): string {
  return randomUUID();
}
