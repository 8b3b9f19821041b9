/** Small waiting helpers for the transport tests (real sockets, real timers). */
import type { Channel } from '../../../agent/transport/channel';
import type { Message } from '../../../agent/protocol/messages';

export function waitFor<T>(
  register: (done: (v: T) => void) => void,
  what: string,
  timeoutMs = 3000,
): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), timeoutMs);
    register((v) => {
      clearTimeout(timer);
      resolve(v);
    });
  });
}

export function nextMessage<T extends Message['type']>(
  ch: Channel,
  type: T,
  timeoutMs = 3000,
): Promise<Extract<Message, { type: T }>> {
  return waitFor(
    (done) => {
      const fn = (m: Message): void => {
        if (m.type === type) {
          ch.off('message', fn);
          done(m as Extract<Message, { type: T }>);
        }
      };
      ch.on('message', fn);
    },
    `a ${type} message`,
    timeoutMs,
  );
}

export function nextEvent(ch: Channel, ev: 'open' | 'close', timeoutMs = 3000): Promise<void> {
  return waitFor<void>((done) => ch.once(ev, () => done()), `${ev}`, timeoutMs);
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
