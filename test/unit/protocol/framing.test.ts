/**
 * Framing: what a reader makes of the bytes a peer (or a broken peer) sends.
 */
import { LineDecoder, encode, RESYNC, type FrameEvent } from '../../../agent/protocol/framing';
import { MAX_LINE_BYTES } from '../../../agent/protocol/messages';
import { NestError } from '../../../agent/common/errors';

const lines = (evs: FrameEvent[]): string[] =>
  evs.flatMap((e) => (e.kind === 'line' ? [e.line] : []));

test('many lines in one chunk come out in order', () => {
  const d = new LineDecoder();
  expect(lines(d.push(Buffer.from('{"a":1}\n{"b":2}\n{"c":3}\n')))).toEqual([
    '{"a":1}',
    '{"b":2}',
    '{"c":3}',
  ]);
  expect(d.buffered).toBe(0);
});

test('a line split across chunks, even inside a multi-byte character, is joined', () => {
  const d = new LineDecoder();
  const whole = Buffer.from('{"reason":"mémoire ☃"}\n', 'utf8');
  const out: FrameEvent[] = [];
  // One byte a chunk: splits the 2- and 3-byte characters too.
  for (let i = 0; i < whole.length; i++) out.push(...d.push(whole.subarray(i, i + 1)));
  expect(out).toEqual([{ kind: 'line', line: '{"reason":"mémoire ☃"}' }]);
});

test('the decoder copies what it keeps: a reused read buffer does not corrupt a partial line', () => {
  const d = new LineDecoder();
  const buf = Buffer.from('{"a":');
  d.push(buf);
  buf.write('XXXXX');
  expect(lines(d.push(Buffer.from('1}\n')))).toEqual(['{"a":1}']);
});

test('blank lines and CRLF endings are tolerated (a person typing into socat)', () => {
  const d = new LineDecoder();
  expect(lines(d.push(Buffer.from('\n\r\n{"a":1}\r\n')))).toEqual(['{"a":1}']);
});

test('a line at the cap passes; one byte more is discarded up to its newline and reported once', () => {
  const d = new LineDecoder();
  const atCap = 'x'.repeat(MAX_LINE_BYTES - 1);
  expect(lines(d.push(Buffer.from(atCap + '\n')))).toEqual([atCap]);

  const over = Buffer.from('y'.repeat(MAX_LINE_BYTES) + '\n{"next":true}\n');
  expect(d.push(over)).toEqual([
    { kind: 'oversize', bytes: MAX_LINE_BYTES, limit: MAX_LINE_BYTES },
    { kind: 'line', line: '{"next":true}' },
  ]);
});

test('an endless line never grows the buffer past the cap', () => {
  const d = new LineDecoder();
  const chunk = Buffer.alloc(16 * 1024, 0x61);
  let maxHeld = 0;
  for (let i = 0; i < 1024; i++) {
    // 16 MiB in all, no newline
    expect(d.push(chunk)).toEqual([]);
    maxHeld = Math.max(maxHeld, d.buffered);
  }
  expect(maxHeld).toBeLessThan(MAX_LINE_BYTES);
  expect(d.push(Buffer.from('\n'))).toEqual([
    { kind: 'oversize', bytes: 16 * 1024 * 1024, limit: MAX_LINE_BYTES },
  ]);
});

test('0xFF mid-line discards the partial line; the next line is read whole', () => {
  const d = new LineDecoder();
  const evs = d.push(Buffer.concat([Buffer.from('{"half":'), RESYNC, Buffer.from('{"b":2}\n')]));
  expect(evs).toEqual([
    { kind: 'resync', discarded: 8 },
    { kind: 'line', line: '{"b":2}' },
  ]);
});

test('0xFF split from its line across chunks still resyncs; 0xFF during an oversize line reports it', () => {
  const d = new LineDecoder();
  d.push(Buffer.from('{"stale'));
  expect(d.push(RESYNC)).toEqual([{ kind: 'resync', discarded: 7 }]);
  d.push(Buffer.alloc(MAX_LINE_BYTES + 10, 0x61));
  expect(d.push(Buffer.concat([RESYNC, Buffer.from('{"ok":1}\n')]))).toEqual([
    { kind: 'oversize', bytes: MAX_LINE_BYTES + 10, limit: MAX_LINE_BYTES },
    { kind: 'line', line: '{"ok":1}' },
  ]);
});

test('invalid UTF-8 is reported and dropped, the following line is read', () => {
  const d = new LineDecoder();
  const evs = d.push(
    Buffer.concat([Buffer.from([0x7b, 0xc3, 0x28, 0x7d, 0x0a]), Buffer.from('{}\n')]),
  );
  expect(evs).toEqual([
    { kind: 'invalid-utf8', bytes: 4 },
    { kind: 'line', line: '{}' },
  ]);
});

test('encode writes one JSON line and refuses one the peer would discard', () => {
  expect(encode({ type: 'ping', id: 'p1', t: 1 }).toString()).toBe(
    '{"type":"ping","id":"p1","t":1}\n',
  );
  // A newline inside a string is escaped, so a message is always exactly one line.
  expect(encode({ reason: 'a\nb' }).toString().split('\n')).toHaveLength(2);
  const big = { type: 'error', message: 'z'.repeat(MAX_LINE_BYTES) };
  expect(() => encode(big)).toThrow(NestError);
  try {
    encode(big);
  } catch (e) {
    expect((e as NestError).code).toBe('PROTOCOL_OVERSIZE');
    expect((e as NestError).message).toMatch(/type error.*over the 65536-byte cap/);
  }
});
