/**
 * Reads an example session out of a protocol document and plays one side of it over a raw
 * socket, checking the other side's lines against the document.
 *
 * Written from the documents alone (docs/protocol.md, "Example session", and
 * docs/project-protocol.md, "Example session"): no import from agent/, so what passes
 * here is what a third party following the documents gets. The block format, as the documents state it:
 *
 *   ```nestbroker-session            (or nestbroker-project-session)
 *   H> <FF>                          the byte 0xFF alone, no newline
 *   G> {"type":"hello",...}          a JSON line; on the wire followed by one '\n'
 *   ```
 *
 * The first letter is who writes the line (H host, G guest; P project, A agent). We write
 * our side's lines exactly as shown, except values the document names as variable, and
 * read the other side's, compared byte for byte after putting in the variable values they
 * actually had.
 */
import net from 'node:net';

export interface SessionLine {
  /** The writer: one letter (H, G, P or A). */
  from: string;
  /** '<FF>' for the resync byte, else the JSON text of the line (without its '\n'). */
  text: string;
  /** Line number in the document, for messages. */
  at: number;
}

/** Every fenced block with this info string, as lines. */
export function sessionBlocks(markdown: string, info: string): SessionLine[][] {
  const blocks: SessionLine[][] = [];
  let cur: SessionLine[] | null = null;
  markdown.split('\n').forEach((line, i) => {
    if (cur === null) {
      if (line.trim() === '```' + info) cur = [];
      return;
    }
    if (line.trim() === '```') {
      blocks.push(cur);
      cur = null;
      return;
    }
    const m = /^([A-Z])> (.*)$/.exec(line);
    if (!m) throw new Error(`line ${i + 1}: not "X> bytes": ${line}`);
    cur.push({ from: m[1], text: m[2], at: i + 1 });
  });
  if (cur !== null) throw new Error(`unterminated \`\`\`${info} block`);
  return blocks;
}

/** The text of a section (from its heading to the next heading of the same or a higher level). */
export function section(markdown: string, heading: string): string {
  const lines = markdown.split('\n');
  const start = lines.findIndex((l) => /^#+ /.test(l) && l.replace(/^#+ /, '') === heading);
  if (start < 0) throw new Error(`no section "${heading}"`);
  const level = /^#+/.exec(lines[start])![0].length;
  let end = start + 1;
  while (end < lines.length) {
    const m = /^(#+) /.exec(lines[end]);
    if (m && m[1].length <= level) break;
    end++;
  }
  return lines.slice(start, end).join('\n');
}

/** One frame read from the peer: the resync byte, or a line (without '\n'). */
export type Frame = '<FF>' | string;

/** Reads frames off a socket: 0xFF alone is a frame; otherwise lines split at '\n'. */
export class FrameReader {
  private readonly frames: Frame[] = [];
  private partial: Buffer[] = [];
  private waiter: (() => void) | null = null;
  private closed = false;

  constructor(readonly sock: net.Socket) {
    sock.on('data', (chunk: Buffer) => this.push(chunk));
    sock.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
  }

  private push(chunk: Buffer): void {
    let start = 0;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i];
      if (b !== 0x0a && b !== 0xff) continue;
      this.partial.push(chunk.subarray(start, i));
      const bytes = Buffer.concat(this.partial);
      this.partial = [];
      if (b === 0xff) {
        if (bytes.length > 0) this.frames.push(`(partial line ${bytes.toString('utf8')})`);
        this.frames.push('<FF>');
      } else this.frames.push(bytes.toString('utf8'));
      start = i + 1;
    }
    if (start < chunk.length) this.partial.push(Buffer.from(chunk.subarray(start)));
    this.waiter?.();
  }

  /** The next `n` frames, or an error naming what came when they do not within `ms`. */
  async take(n: number, ms: number): Promise<Frame[]> {
    const until = Date.now() + ms;
    while (this.frames.length < n) {
      if (this.closed) throw new Error(`connection closed after ${JSON.stringify(this.frames)}`);
      const left = until - Date.now();
      if (left <= 0)
        throw new Error(`waited ${ms} ms for ${n} frames, got ${JSON.stringify(this.frames)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          this.waiter = null;
          resolve();
        };
      });
    }
    return this.frames.splice(0, n);
  }

  /** Frames received and not yet taken. */
  get pending(): readonly Frame[] {
    return this.frames;
  }
}

/** Paths written as in the documents: `id`, `outcome.projects[].ms`. */
export type VariablePaths = Record<string, string[]>;

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

function walk(
  expected: Json,
  actual: Json,
  segs: string[],
  visit: (e: Json, a: Json) => Json,
): Json {
  if (segs.length === 0) return visit(expected, actual);
  const [head, ...rest] = segs;
  if (head.endsWith('[]')) {
    const key = head.slice(0, -2);
    const e = (expected as Record<string, Json>)?.[key];
    const a = (actual as Record<string, Json>)?.[key];
    if (!Array.isArray(e) || !Array.isArray(a) || e.length !== a.length) return expected;
    const out = e.map((x, i) => walk(x, a[i], rest, visit));
    return { ...(expected as Record<string, Json>), [key]: out };
  }
  if (expected === null || typeof expected !== 'object' || Array.isArray(expected)) return expected;
  if (!(head in expected) || actual === null || typeof actual !== 'object') return expected;
  return {
    ...expected,
    [head]: walk(expected[head], (actual as Record<string, Json>)[head], rest, visit),
  };
}

/**
 * Plays our side of a session; returns nothing, throws on the first mismatch. `ids` maps a
 * variable value of the document to the value the peer actually used, so a later line of
 * ours that quotes it (a `replyTo`) carries the real one.
 */
export class SessionPlayer {
  readonly ids = new Map<string, Json>();
  /** Every frame both ways, for a failure's message. */
  readonly transcript: string[] = [];

  constructor(
    private readonly sock: net.Socket,
    private readonly reader: FrameReader,
    private readonly us: string,
    private readonly variable: VariablePaths,
    /** Values of ours substituted before sending: a document token → the real one. */
    private readonly ours: Map<string, string> = new Map(),
    private readonly timeoutMs = 30_000,
  ) {}

  /** The bytes our line puts on the wire. */
  bytesOf(line: SessionLine): Buffer {
    if (line.text === '<FF>') return Buffer.from([0xff]);
    const parsed = JSON.parse(line.text) as Json;
    const swapped = swap(parsed, (v) => {
      if (typeof v !== 'string') return v;
      if (this.ours.has(v)) return this.ours.get(v)!;
      return this.ids.has(v) ? this.ids.get(v)! : v;
    });
    return Buffer.from(JSON.stringify(swapped) + '\n', 'utf8');
  }

  async play(lines: SessionLine[], hooks: { before?: (l: SessionLine) => Promise<void> } = {}) {
    for (let i = 0; i < lines.length;) {
      const l = lines[i];
      if (l.from === this.us) {
        await hooks.before?.(l);
        this.transcript.push(`${l.from}> ${l.text}`);
        this.sock.write(this.bytesOf(l));
        i++;
        continue;
      }
      // A run of the peer's lines: read as many, then match them.
      let j = i;
      while (j < lines.length && lines[j].from !== this.us) j++;
      const want = lines.slice(i, j);
      const got = await this.reader.take(want.length, this.timeoutMs).catch((err: Error) => {
        throw new Error(`${err.message}\nat line ${l.at}; so far:\n${this.transcript.join('\n')}`);
      });
      for (const g of got) this.transcript.push(`${l.from}> ${g}`);
      this.match(want, got);
      i = j;
    }
  }

  /**
   * The peer's lines against the document's. In order, except that the `progress` lines
   * of one run may interleave differently between projects (each project's own stay in
   * order), as the document allows.
   */
  private match(want: SessionLine[], got: Frame[]): void {
    const used = new Set<number>();
    want.forEach((w, k) => {
      const isProgress = (t: string): boolean => /^\{"type":"progress"/.test(t);
      let candidates: number[] = [k];
      if (isProgress(w.text)) {
        // Any unused progress frame in the same run of progress lines.
        let a = k;
        while (a > 0 && isProgress(want[a - 1].text)) a--;
        let b = k;
        while (b + 1 < want.length && isProgress(want[b + 1].text)) b++;
        candidates = [];
        for (let x = a; x <= b; x++) if (!used.has(x)) candidates.push(x);
      }
      const errors: string[] = [];
      for (const c of candidates) {
        const err = this.compare(w, got[c], false);
        if (err === null) {
          this.compare(w, got[c], true);
          used.add(c);
          return;
        }
        errors.push(err);
      }
      throw new Error(
        `line ${w.at} of the document does not match what the peer sent:\n${errors.join('\n')}\n` +
          `transcript:\n${this.transcript.join('\n')}`,
      );
    });
  }

  /** null when `got` is `want` once the variable values are put in; else why not. */
  private compare(want: SessionLine, got: Frame, commit: boolean): string | null {
    if (want.text === '<FF>' || got === '<FF>')
      return want.text === got ? null : `want ${want.text}\n got ${got}`;
    let e: Json;
    let a: Json;
    try {
      e = JSON.parse(want.text) as Json;
      a = JSON.parse(got) as Json;
    } catch {
      return `want ${want.text}\n got ${got}`;
    }
    const type = (e as { type?: string })?.type ?? '';
    const paths = [...(this.variable['*'] ?? []), ...(this.variable[type] ?? [])];
    const learned: [Json, Json][] = [];
    for (const p of paths)
      e = walk(e, a, p.split('.'), (ev, av) => {
        if (av === undefined) return ev;
        // A variable value seen before stands for the value it had then.
        if (typeof ev === 'string' && this.ids.has(ev)) return this.ids.get(ev)!;
        learned.push([ev, av]);
        return av;
      });
    // Values learned earlier (an id the peer quotes again) are the actual ones too.
    e = swap(e, (v) => (typeof v === 'string' && this.ids.has(v) ? this.ids.get(v)! : v));
    const text = JSON.stringify(e);
    if (text !== got) return `want ${text}\n got ${got}`;
    if (commit) for (const [ev, av] of learned) if (typeof ev === 'string') this.ids.set(ev, av);
    return null;
  }
}

function swap(v: Json, f: (v: Json) => Json): Json {
  if (Array.isArray(v)) return v.map((x) => swap(x, f));
  if (v !== null && typeof v === 'object') {
    const out: Record<string, Json> = {};
    for (const [k, x] of Object.entries(v)) out[k] = swap(x, f);
    return out;
  }
  return f(v);
}

/** A raw connection to a unix socket, with its reader. */
export async function connect(
  socketPath: string,
): Promise<{ sock: net.Socket; reader: FrameReader }> {
  const sock = net.connect(socketPath);
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  return { sock, reader: new FrameReader(sock) };
}
