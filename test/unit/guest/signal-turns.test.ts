/**
 * SignalTurns, the order of stop signals within a notice's stops (agent/guest/executor.ts;
 * docs/architecture.md, "Why it is built this way": stop signals go out in rank order,
 * lowest first, while their exits are awaited together). Each turn opens once the one
 * before it was released; an abort (the deadline) ends every wait.
 */
import { SignalTurns } from '../../../agent/guest/executor';

/** Which waits have resolved so far, after everything runnable has run. */
async function resolved(waits: Record<string, Promise<void>>): Promise<string[]> {
  const done: string[] = [];
  for (const [name, p] of Object.entries(waits)) void p.then(() => done.push(name));
  await new Promise((r) => setImmediate(r));
  return done.sort();
}

test('each turn opens only once the one before it is released, in the given order', async () => {
  const turns = new SignalTurns(['cache', 'batch', 'web']);
  const waits = {
    cache: turns.wait('cache'),
    batch: turns.wait('batch'),
    web: turns.wait('web'),
  };
  expect(await resolved(waits)).toEqual(['cache']);
  turns.release('cache');
  expect(await resolved(waits)).toEqual(['batch', 'cache']);
  turns.release('batch');
  expect(await resolved(waits)).toEqual(['batch', 'cache', 'web']);
});

test('a release out of order opens only the turn right after it', async () => {
  const turns = new SignalTurns(['a', 'b', 'c']);
  const waits = { b: turns.wait('b'), c: turns.wait('c') };
  turns.release('b'); // b's stop ended without signalling (nothing ran): c may go
  expect(await resolved(waits)).toEqual(['c']);
  turns.release('a');
  expect(await resolved(waits)).toEqual(['b', 'c']);
});

test('an abort ends every wait; a name not in the order never waits', async () => {
  const turns = new SignalTurns(['a', 'b', 'c']);
  const ac = new AbortController();
  const waits = { b: turns.wait('b', ac.signal), c: turns.wait('c', ac.signal) };
  expect(await resolved(waits)).toEqual([]);
  ac.abort();
  expect(await resolved(waits)).toEqual(['b', 'c']);
  expect(await resolved({ late: turns.wait('c', ac.signal), other: turns.wait('x') })).toEqual([
    'late',
    'other',
  ]);
});
