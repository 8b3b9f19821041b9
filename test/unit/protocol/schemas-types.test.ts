/**
 * Keeps the hand-written types (messages.ts, broker/types.ts) and the zod schemas in
 * step. The checks are types: `tsc -p tsconfig.json` (make typecheck) fails when a field
 * is added to one and not the other, or when its type differs.
 */
import type { z } from 'zod';
import * as S from '../../../agent/protocol/schemas';
import type * as M from '../../../agent/protocol/messages';
import type * as B from '../../../agent/broker/types';

/** true only when A and B are the same type (not merely assignable one way). */
type Equal<A, B> =
  (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
function expectType<T extends true>(): T | void {}

expectType<Equal<z.infer<typeof S.ResourcesSchema>, B.Resources>>();
expectType<Equal<z.infer<typeof S.NoticeSchema>, B.Notice>>();
expectType<Equal<z.infer<typeof S.ProjectLimitsSchema>, B.ProjectLimits>>();
expectType<Equal<z.infer<typeof S.ProjectOutcomeSchema>, B.ProjectOutcome>>();
expectType<Equal<z.infer<typeof S.OutcomeSchema>, B.Outcome>>();
expectType<Equal<z.infer<typeof S.InventoryProjectSchema>, M.InventoryProject>>();
expectType<Equal<z.infer<typeof S.HelloSchema>, M.Hello>>();
expectType<Equal<z.infer<typeof S.WelcomeSchema>, M.Welcome>>();
expectType<Equal<z.infer<typeof S.NoticeMsgSchema>, M.NoticeMsg>>();
expectType<Equal<z.infer<typeof S.RestoreMsgSchema>, M.RestoreMsg>>();
expectType<Equal<z.infer<typeof S.AckSchema>, M.Ack>>();
expectType<Equal<z.infer<typeof S.ProgressSchema>, M.Progress>>();
expectType<Equal<z.infer<typeof S.OutcomeMsgSchema>, M.OutcomeMsg>>();
expectType<Equal<z.infer<typeof S.OutcomePartSchema>, M.OutcomePart>>();
expectType<Equal<z.infer<typeof S.CancelSchema>, M.Cancel>>();
expectType<Equal<z.infer<typeof S.PlanRequestSchema>, M.PlanRequest>>();
expectType<Equal<z.infer<typeof S.PlanProjectSchema>, M.PlanProject>>();
expectType<Equal<z.infer<typeof S.PlanResultSchema>, M.PlanResult>>();
expectType<Equal<z.infer<typeof S.PingSchema>, M.Ping>>();
expectType<Equal<z.infer<typeof S.PongSchema>, M.Pong>>();
expectType<Equal<z.infer<typeof S.ErrorMsgSchema>, M.ErrorMsg>>();
expectType<Equal<z.infer<typeof S.MessageSchema>, M.Message>>();
expectType<Equal<z.infer<typeof S.MessageSchema>['type'], M.MessageType>>();

test('the type checks above are compiled by tsc; at run time the type lists agree too', () => {
  const all: Record<M.MessageType, true> = {
    hello: true,
    welcome: true,
    notice: true,
    restore: true,
    ack: true,
    progress: true,
    outcome: true,
    'outcome-part': true,
    cancel: true,
    plan: true,
    'plan-result': true,
    ping: true,
    pong: true,
    error: true,
  };
  expect([...S.MESSAGE_TYPES].sort()).toEqual(Object.keys(all).sort());
});
