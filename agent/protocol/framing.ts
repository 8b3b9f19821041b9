/**
 * Line framing for the host↔guest channel and the operator API: one JSON value a line,
 * each line (with its '\n') at most MAX_LINE_BYTES (docs/protocol.md).
 *
 * The decoder never holds more than `maxLineBytes` of a partial line: a longer line is
 * dropped byte by byte up to its newline and reported once as `oversize`, so a peer that
 * streams an endless line cannot grow our memory. A 0xFF byte discards any partial line,
 * as qemu-guest-agent's `guest-sync-delimited` does: 0xFF never occurs in UTF-8, so a
 * peer can always resynchronise by sending it (after a reconnect on virtio-serial, where
 * the other side may have left half a line in the port).
 */
import { NestError } from '../common/errors';
import { MAX_LINE_BYTES, RESYNC_BYTE } from './messages';

const NEWLINE = 0x0a;
const CR = 0x0d;

export type FrameEvent =
  /** A complete line, without its '\n' (and without a trailing '\r'). Never empty. */
  | { kind: 'line'; line: string }
  /** A line longer than the cap was discarded; `bytes` counts it without its '\n'. */
  | { kind: 'oversize'; bytes: number; limit: number }
  /** A line was not valid UTF-8; it was discarded. */
  | { kind: 'invalid-utf8'; bytes: number }
  /** A 0xFF byte discarded `discarded` bytes of a partial line (0 when there was none). */
  | { kind: 'resync'; discarded: number };

export class LineDecoder {
  /** Bytes of the current partial line (only while it is within the cap). */
  private parts: Buffer[] = [];
  private partLen = 0;
  /** > 0 while the current line is over the cap: how many bytes it has had. */
  private discarding = 0;
  private readonly utf8 = new TextDecoder('utf-8', { fatal: true });
  /** Content bytes a line may have: the cap counts the '\n'. */
  private readonly maxContent: number;

  constructor(readonly maxLineBytes: number = MAX_LINE_BYTES) {
    this.maxContent = maxLineBytes - 1;
  }

  /** Bytes currently held for a partial line (for tests: memory stays bounded). */
  get buffered(): number {
    return this.partLen;
  }

  /** Feeds one chunk; returns what it completed, in order. */
  push(chunk: Buffer): FrameEvent[] {
    const out: FrameEvent[] = [];
    let pos = 0;
    while (pos < chunk.length) {
      const end = nextDelimiter(chunk, pos);
      if (end === -1) {
        this.take(chunk.subarray(pos));
        break;
      }
      this.take(chunk.subarray(pos, end));
      if (chunk[end] === NEWLINE) this.finishLine(out);
      else this.resync(out);
      pos = end + 1;
    }
    return out;
  }

  /** Drops any partial line (when the connection behind the decoder is replaced). */
  reset(): void {
    this.parts = [];
    this.partLen = 0;
    this.discarding = 0;
  }

  private take(bytes: Buffer): void {
    if (bytes.length === 0) return;
    if (this.discarding > 0) {
      this.discarding += bytes.length;
      return;
    }
    if (this.partLen + bytes.length > this.maxContent) {
      this.discarding = this.partLen + bytes.length;
      this.parts = [];
      this.partLen = 0;
      return;
    }
    // Copy: the caller may reuse its read buffer (fs.read on virtio-serial does).
    this.parts.push(Buffer.from(bytes));
    this.partLen += bytes.length;
  }

  private finishLine(out: FrameEvent[]): void {
    if (this.discarding > 0) {
      out.push({ kind: 'oversize', bytes: this.discarding, limit: this.maxLineBytes });
      this.reset();
      return;
    }
    let buf = this.parts.length === 1 ? this.parts[0] : Buffer.concat(this.parts, this.partLen);
    this.reset();
    if (buf.length > 0 && buf[buf.length - 1] === CR) buf = buf.subarray(0, buf.length - 1);
    if (buf.length === 0) return; // blank lines (a human with socat) are not messages
    try {
      out.push({ kind: 'line', line: this.utf8.decode(buf) });
    } catch {
      out.push({ kind: 'invalid-utf8', bytes: buf.length });
    }
  }

  private resync(out: FrameEvent[]): void {
    if (this.discarding > 0) {
      out.push({ kind: 'oversize', bytes: this.discarding, limit: this.maxLineBytes });
    } else {
      out.push({ kind: 'resync', discarded: this.partLen });
    }
    this.reset();
  }
}

function nextDelimiter(chunk: Buffer, from: number): number {
  const nl = chunk.indexOf(NEWLINE, from);
  const ff = chunk.indexOf(RESYNC_BYTE, from);
  if (nl === -1) return ff;
  if (ff === -1) return nl;
  return Math.min(nl, ff);
}

/**
 * JSON + '\n'. Refuses (PROTOCOL_OVERSIZE) a line the peer would discard, so the sender
 * learns of it here rather than by a silent loss on the other side.
 */
export function encode(msg: unknown, maxLineBytes: number = MAX_LINE_BYTES): Buffer {
  const json = JSON.stringify(msg);
  if (json === undefined) {
    throw new NestError('PROTOCOL_INVALID', `cannot encode ${typeof msg} as a JSON line`);
  }
  const buf = Buffer.from(json + '\n', 'utf8');
  if (buf.length > maxLineBytes) {
    const type =
      msg !== null && typeof msg === 'object' && 'type' in msg ? ` (type ${String(msg.type)})` : '';
    throw new NestError(
      'PROTOCOL_OVERSIZE',
      `message${type} is ${buf.length} bytes as a line, over the ${maxLineBytes}-byte cap`,
    );
  }
  return buf;
}

/** The 0xFF resync byte as a buffer, sent first after (re)connecting to drop stale halves. */
export const RESYNC = Buffer.from([RESYNC_BYTE]);
