/**
 * The message types are `z.infer` of the schemas (messages.ts, broker/types.ts): one
 * source. What is left to check is that the type list a reader sees in messages.ts and
 * the discriminated union of schemas.ts name the same messages; `Record<MessageType, …>`
 * below fails to compile when a type is added to or removed from the union.
 */
import * as S from '../../../agent/protocol/schemas';
import type * as M from '../../../agent/protocol/messages';

test('every message type of the union is listed, and only those', () => {
  const all: Record<M.MessageType, true> = {
    hello: true,
    welcome: true,
    notice: true,
    restore: true,
    ack: true,
    progress: true,
    outcome: true,
    'outcome-part': true,
    facts: true,
    cancel: true,
    plan: true,
    'plan-result': true,
    ping: true,
    pong: true,
    error: true,
  };
  expect([...S.MESSAGE_TYPES].sort()).toEqual(Object.keys(all).sort());
});
