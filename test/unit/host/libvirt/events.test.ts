/**
 * `virsh event --loop --all` output as recorded (test/fixtures/libvirt/events.txt): a
 * tunable event with its continuation lines, the life-cycle events of a destroy and a
 * start, then a second domain's define, start, destroy, undefine; in any chunking.
 */
import { EventLineParser, type DomainEvent } from '../../../../agent/host/libvirt/events';
import { fixture } from './fake-virsh';

const expected: DomainEvent[] = [
  {
    type: 'tunable',
    domain: 'nbfix',
    detail: '',
    extra: ['cputune.global_quota: 150000', 'cputune.global_period: 100000'],
  },
  { type: 'lifecycle', domain: 'nbfix', detail: 'Shutdown Finished after host request', extra: [] },
  { type: 'lifecycle', domain: 'nbfix', detail: 'Stopped Destroyed', extra: [] },
  { type: 'lifecycle', domain: 'nbfix', detail: 'Resumed Unpaused', extra: [] },
  { type: 'lifecycle', domain: 'nbfix', detail: 'Started Booted', extra: [] },
  ...[
    'Defined Added',
    'Resumed Unpaused',
    'Started Booted',
    'Shutdown Finished after host request',
    'Stopped Destroyed',
    'Undefined Removed',
  ].map((detail) => ({ type: 'lifecycle', domain: 'nbbare', detail, extra: [] })),
];

test('the recorded events, whole or a byte at a time', async () => {
  const text = await fixture('events.txt');
  for (const size of [text.length, 1, 7]) {
    const got: DomainEvent[] = [];
    const p = new EventLineParser((e) => got.push(e));
    for (let i = 0; i < text.length; i += size) p.push(text.slice(i, i + size));
    p.flush();
    expect(got).toEqual(expected);
  }
});

test('a life-cycle event is emitted at its newline, not held for the next line', () => {
  const got: DomainEvent[] = [];
  const p = new EventLineParser((e) => got.push(e));
  p.push("event 'lifecycle' for domain 'vm1': Started Booted\n");
  expect(got.map((e) => e.detail)).toEqual(['Started Booted']);
  p.push('events received: 1\n');
  expect(got).toHaveLength(1);
});
