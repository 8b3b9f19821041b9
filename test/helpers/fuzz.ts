/**
 * Seeded, dependency-free fuzz input for the protocol (docs/reliability.md, "Bad input":
 * bad input gets a clear error and changes nothing). The same seed gives the same cases on
 * every machine, so a failure is reproduced by its case number alone.
 *
 *   const rng = new Rng(0x5eed);
 *   const gen = new ProtocolFuzz(rng);
 *   const c = gen.next();   // { kind: 'mutated', line: '{"type":"notice",...}' }
 *
 * Cases are lines (without '\n') or raw byte runs that the decoder must survive. Valid
 * messages are built by the same generator, so a mutation starts from a real message of
 * every type (messages.ts) and damages one thing in it.
 */
import v8 from 'node:v8';
import vm from 'node:vm';
import { MAX_LINE_BYTES } from '../../agent/protocol/messages';

/** mulberry32: small, fast, good enough for test input (not for secrets). */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  /** [0, 1) */
  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)];
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = Math.floor(this.next() * 256);
    return b;
  }
  /** Fisher–Yates in place. */
  shuffle<T>(xs: T[]): T[] {
    for (let i = xs.length - 1; i > 0; i--) {
      const j = Math.floor(this.next() * (i + 1));
      [xs[i], xs[j]] = [xs[j], xs[i]];
    }
    return xs;
  }
}

/**
 * Numbers as JSON text can carry them, including what JSON.parse turns into something
 * surprising: 1e309 → Infinity, -0, 2^60 (not a safe integer), 1e-400 → 0.
 */
export const HOSTILE_NUMBER_TEXT = [
  '1e309',
  '-1e309',
  '-0',
  '-1',
  '-0.5',
  '0.1',
  '1152921504606846976', // 2^60
  '9007199254740993', // 2^53 + 1
  '1e-400',
  '1e21',
  '4097',
  '-9007199254740992',
  '123456789012345678901234567890',
] as const;

/** Values of every JSON type, and JSON-like text that is not JSON (NaN, Infinity, undefined). */
export const HOSTILE_VALUE_TEXT = [
  ...HOSTILE_NUMBER_TEXT,
  'null',
  'true',
  'false',
  '""',
  '"max"',
  '"-1"',
  '"1e309"',
  '"\\u0000"',
  '"../../etc/passwd"',
  '"__proto__"',
  '[]',
  '{}',
  '[1,2,3]',
  '{"__proto__":{"polluted":true}}',
  '{"constructor":{"prototype":{"polluted":true}}}',
  '"' + 'x'.repeat(300) + '"',
  '"2025-13-45T99:99:99Z"',
  '"\\ud800"', // a lone surrogate
] as const;

/** Not JSON at all, though a careless parser might accept it. */
export const NOT_JSON_TEXT = ['NaN', 'Infinity', '-Infinity', 'undefined', "'x'", '0x10', '.5'];

export const PROTO_KEYS = ['__proto__', 'constructor', 'prototype'] as const;

const ISO = '2025-01-01T00:00:00.000Z';

/** One valid example of every message type (messages.ts), varied by the generator. */
export function validMessages(rng: Rng): Record<string, unknown>[] {
  const id = (): string => `m-${rng.int(0, 1e9)}`;
  const res = () => ({ cpus: rng.int(0, 64) / 4, memoryBytes: rng.int(0, 2 ** 40) });
  const notice = (kind: 'reclaim' | 'restore') => ({
    id: `n-${rng.int(0, 1e6)}`,
    guest: 'vm1',
    seq: rng.int(0, 1e6),
    kind,
    change: res(),
    allocation: res(),
    deadline: ISO,
    reason: 'fuzz',
    issuedAt: ISO,
  });
  const limits = () => ({
    memoryHigh: rng.chance(0.5) ? 'max' : rng.int(0, 2 ** 40),
    memoryMax: rng.chance(0.5) ? 'max' : rng.int(0, 2 ** 40),
    cpuMax: rng.chance(0.5) ? 'max' : rng.int(1, 16),
    cpuset: '0-1',
  });
  return [
    {
      type: 'hello',
      id: id(),
      version: 1,
      guest: 'vm1',
      inventory: {
        cpus: 2,
        memoryBytes: 2 ** 31,
        projects: [{ name: 'web', priority: rng.int(-100, 100), state: 'running' }],
      },
      lastSeq: rng.int(0, 1000),
    },
    { type: 'welcome', id: id(), replyTo: id(), version: 1, guest: 'vm1', heartbeatMs: 1000 },
    { type: 'notice', id: id(), notice: notice('reclaim') },
    { type: 'restore', id: id(), notice: notice('restore') },
    { type: 'ack', id: id(), replyTo: id(), noticeId: 'n-1', state: 'accepted' },
    {
      type: 'progress',
      id: id(),
      noticeId: 'n-1',
      project: 'batch',
      phase: 'stopped',
      action: 'stopped',
      exit: 'graceful',
      ms: rng.int(0, 1e5),
    },
    {
      type: 'outcome',
      id: id(),
      outcome: {
        noticeId: 'n-1',
        guest: 'vm1',
        status: 'complete',
        projects: [
          {
            name: 'batch',
            action: 'stopped',
            before: limits(),
            after: limits(),
            exit: 'graceful',
            ms: 10,
            reason: 'lowest priority',
          },
        ],
        freed: res(),
        startedAt: ISO,
        finishedAt: ISO,
        ms: 10,
      },
    },
    { type: 'facts', id: id(), onlineCpus: [0, 1], memTotal: 2 * 1024 ** 3 },
    { type: 'cancel', id: id(), noticeId: 'n-1' },
    { type: 'plan', id: id(), kind: 'reclaim', allocation: res() },
    {
      type: 'plan-result',
      id: id(),
      replyTo: id(),
      allocation: res(),
      projectAllocation: res(),
      fits: true,
      reasons: ['all fit'],
      projects: [
        {
          project: 'web',
          priority: 100,
          action: 'shrunk',
          before: limits(),
          after: limits(),
          mustComeDownFrom: 1024,
          reason: 'shrunk to fit',
        },
      ],
    },
    { type: 'ping', id: id(), t: rng.int(0, 2 ** 40) },
    { type: 'pong', id: id(), replyTo: id(), t: 5 },
    {
      type: 'error',
      id: id(),
      code: 'PROTOCOL_INVALID',
      message: 'bad',
      problems: [{ field: 'x', message: 'y' }],
    },
  ];
}

export type CaseKind =
  | 'valid'
  | 'random-bytes'
  | 'random-ascii'
  | 'oversize'
  | 'ff-inside'
  | 'deep-json'
  | 'huge-json'
  | 'wrong-type'
  | 'hostile-number'
  | 'not-json'
  | 'unknown-field'
  | 'proto-key'
  | 'duplicate-key'
  | 'field-drop'
  | 'field-replace'
  | 'type-swap'
  | 'random-json';

export interface FuzzCase {
  n: number;
  kind: CaseKind;
  /** The bytes of one "line", without the trailing '\n'; may contain '\n' or 0xFF itself. */
  bytes: Buffer;
}

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** Paths to every field of a value (objects and arrays), for mutation. */
function paths(v: unknown, prefix: (string | number)[] = [], out: (string | number)[][] = []) {
  if (v !== null && typeof v === 'object') {
    for (const [k, c] of Object.entries(v)) {
      const p = [...prefix, Array.isArray(v) ? Number(k) : k];
      out.push(p);
      paths(c, p, out);
    }
  }
  return out;
}

/**
 * Writes `valueText` (raw JSON text, so 1e309 and -0 survive) at `path` of `msg`, by
 * stringifying with a placeholder and replacing it.
 */
function withRawAt(msg: unknown, path: (string | number)[], valueText: string): string {
  const copy = structuredClone(msg) as Record<string | number, unknown>;
  let o = copy;
  for (const k of path.slice(0, -1)) o = o[k] as Record<string | number, unknown>;
  const mark = '\u0001FUZZ\u0001';
  // defineProperty: a plain `o.__proto__ = x` would set the prototype, not a key.
  Object.defineProperty(o, path[path.length - 1], {
    value: mark,
    enumerable: true,
    writable: true,
    configurable: true,
  });
  return JSON.stringify(copy).replace(JSON.stringify(mark), () => valueText);
}

const TYPES = [
  'hello',
  'welcome',
  'notice',
  'restore',
  'ack',
  'progress',
  'outcome',
  'facts',
  'cancel',
  'plan',
  'plan-result',
  'ping',
  'pong',
  'error',
];

export class ProtocolFuzz {
  private n = 0;
  constructor(private readonly rng: Rng) {}

  /** Every kind, with weights that favour the structured mutations. */
  static readonly KINDS: readonly [CaseKind, number][] = [
    ['valid', 6],
    ['random-bytes', 8],
    ['random-ascii', 5],
    ['oversize', 0.4],
    ['ff-inside', 4],
    ['deep-json', 2],
    ['huge-json', 0.6],
    ['wrong-type', 6],
    ['hostile-number', 12],
    ['not-json', 3],
    ['unknown-field', 6],
    ['proto-key', 6],
    ['duplicate-key', 5],
    ['field-drop', 10],
    ['field-replace', 12],
    ['type-swap', 8],
    ['random-json', 6],
  ];

  private pickKind(): CaseKind {
    const total = ProtocolFuzz.KINDS.reduce((s, [, w]) => s + w, 0);
    let x = this.rng.next() * total;
    for (const [k, w] of ProtocolFuzz.KINDS) {
      x -= w;
      if (x < 0) return k;
    }
    return 'valid';
  }

  next(): FuzzCase {
    const kind = this.pickKind();
    return { n: this.n++, kind, bytes: this.make(kind) };
  }

  /** A valid message of a random type, as an object. */
  valid(): Record<string, unknown> {
    return this.rng.pick(validMessages(this.rng));
  }

  randomJson(depth: number): Json {
    const r = this.rng;
    const k = depth <= 0 ? r.int(0, 3) : r.int(0, 5);
    switch (k) {
      case 0:
        return null;
      case 1:
        return r.chance(0.5);
      case 2:
        return r.chance(0.5) ? r.int(-1e6, 1e6) : (r.next() - 0.5) * 10 ** r.int(0, 300);
      case 3:
        return r.bytes(r.int(0, 12)).toString('latin1');
      case 4:
        return Array.from({ length: r.int(0, 4) }, () => this.randomJson(depth - 1));
      default: {
        const o: { [k: string]: Json } = {};
        const n = r.int(0, 4);
        for (let i = 0; i < n; i++)
          o[r.chance(0.3) ? r.pick(['type', 'id', 'notice', 't']) : `k${r.int(0, 99)}`] =
            this.randomJson(depth - 1);
        if (r.chance(0.5)) o.type = r.pick(TYPES);
        return o;
      }
    }
  }

  private make(kind: CaseKind): Buffer {
    const r = this.rng;
    const msg = this.valid();
    const fields = paths(msg).filter((p) => p[0] !== 'type' || r.chance(0.2));
    const at = (): (string | number)[] => r.pick(fields);
    /** A new key beside an existing field of an object (arrays would drop a named key). */
    const besideInObject = (key: string): (string | number)[] => {
      const inObjects = fields.filter((p) => typeof p[p.length - 1] === 'string');
      return [...r.pick(inObjects).slice(0, -1), key];
    };
    switch (kind) {
      case 'valid':
        return Buffer.from(JSON.stringify(msg));
      case 'random-bytes':
        // Newlines inside are fine: they split this case into several lines.
        return r.bytes(r.int(1, 512));
      case 'random-ascii':
        return Buffer.from(
          Array.from({ length: r.int(1, 200) }, () =>
            String.fromCharCode(r.pick([r.int(0x20, 0x7e), 0x7b, 0x7d, 0x22, 0x3a])),
          ).join(''),
        );
      case 'oversize': {
        // Beyond the cap, sometimes valid JSON underneath (a huge reason), sometimes not.
        const n = MAX_LINE_BYTES + r.int(-2, 4096);
        if (r.chance(0.5)) {
          const base = JSON.stringify({ ...msg, pad: '' });
          return Buffer.from(base.replace('"pad":""', `"pad":"${'a'.repeat(n)}"`));
        }
        return Buffer.alloc(n, 0x61);
      }
      case 'ff-inside': {
        const b = Buffer.from(JSON.stringify(msg));
        const i = r.int(0, b.length);
        return Buffer.concat([b.subarray(0, i), Buffer.from([0xff]), b.subarray(i)]);
      }
      case 'deep-json': {
        // Within the cap (which must not crash the parser's error path: a 20 000-deep
        // array is 40 KB) and beyond it.
        const d = r.pick([10, 100, 1000, 5000, 10_000, 20_000, 32_000, 40_000]);
        const open = r.chance(0.5) ? '[' : '{"a":';
        const close = open === '[' ? ']' : '}';
        const deep = open.repeat(d) + (open === '[' ? '' : '1') + close.repeat(d);
        return Buffer.from(r.chance(0.5) ? deep : withRawAt(msg, at(), deep));
      }
      case 'huge-json': {
        // Many small values near the cap: 10 001 projects, or a long array of numbers.
        if (r.chance(0.5)) {
          const n = r.pick([1000, 5000, 12_000]);
          return Buffer.from(withRawAt(msg, at(), `[${Array(n).fill('0').join(',')}]`));
        }
        const inv = {
          type: 'hello',
          id: 'h',
          version: 1,
          guest: 'vm1',
          inventory: { cpus: 1, memoryBytes: 1, projects: [] as unknown[] },
          lastSeq: 0,
        };
        const n = r.pick([100, 1000, 1500]);
        for (let i = 0; i < n; i++)
          inv.inventory.projects.push({ name: `p${i}`, priority: 0, state: 'running' });
        return Buffer.from(JSON.stringify(inv));
      }
      case 'wrong-type':
        return Buffer.from(withRawAt(msg, at(), r.pick(HOSTILE_VALUE_TEXT)));
      case 'hostile-number': {
        const numeric = fields.filter((p) => {
          let v: unknown = msg;
          for (const k of p) v = (v as Record<string | number, unknown>)[k];
          return typeof v === 'number';
        });
        const p = numeric.length > 0 ? r.pick(numeric) : at();
        return Buffer.from(withRawAt(msg, p, r.pick(HOSTILE_NUMBER_TEXT)));
      }
      case 'not-json':
        return Buffer.from(
          r.chance(0.5)
            ? r.pick(NOT_JSON_TEXT)
            : withRawAt(msg, at(), r.pick(NOT_JSON_TEXT)).slice(0, r.chance(0.3) ? -1 : undefined),
        );
      case 'unknown-field': {
        const p = besideInObject(`x${r.int(0, 999)}`);
        return Buffer.from(withRawAt(msg, p, r.pick(HOSTILE_VALUE_TEXT)));
      }
      case 'proto-key': {
        // `__proto__` as an own key (JSON.parse makes one; object literals would not).
        const p = besideInObject(r.pick(PROTO_KEYS));
        const text = withRawAt(msg, p, r.pick(HOSTILE_VALUE_TEXT));
        return Buffer.from(
          r.chance(0.5) ? text : text.replace('{', '{"__proto__":{"type":"ping"},'),
        );
      }
      case 'duplicate-key': {
        // The same key twice, the second with another value (JSON.parse keeps the last).
        const p = at();
        const key = String(p[p.length - 1]);
        const text = withRawAt(msg, p, r.pick(HOSTILE_VALUE_TEXT));
        return Buffer.from(
          text.replace(`"${key}":`, `"${key}":${JSON.stringify(msg.id)},"${key}":`),
        );
      }
      case 'field-drop': {
        const p = at();
        const copy = structuredClone(msg) as Record<string | number, unknown>;
        let o = copy;
        for (const k of p.slice(0, -1)) o = o[k] as Record<string | number, unknown>;
        if (Array.isArray(o)) o.splice(Number(p[p.length - 1]), 1);
        else delete o[p[p.length - 1]];
        return Buffer.from(JSON.stringify(copy));
      }
      case 'field-replace':
        return Buffer.from(withRawAt(msg, at(), JSON.stringify(this.randomJson(2))));
      case 'type-swap': {
        // Another message's type on this body, or a type that does not exist.
        const t = r.chance(0.8) ? r.pick(TYPES) : r.pick(['Notice', 'NOTICE', 'x', '', 'ping ']);
        return Buffer.from(JSON.stringify({ ...msg, type: t }));
      }
      case 'random-json':
        return Buffer.from(JSON.stringify(this.randomJson(4)));
    }
  }
}

/** A full garbage collection, without starting node with --expose-gc (v8's own switch). */
function fullGc(): void {
  v8.setFlagsFromString('--expose-gc');
  (vm.runInNewContext('gc') as () => void)();
}

/**
 * Process memory figures in MiB, for reports and bounds. After a full GC: what is retained,
 * not how much garbage the last burst left for a collector that had not run yet (without
 * it, a fresh-clone CI run measured 166 MiB of "growth" for the 20 000-line live stream).
 */
export function memoryMiB(): { heapUsed: number; rss: number } {
  fullGc();
  const m = process.memoryUsage();
  return {
    heapUsed: Math.round((m.heapUsed / 2 ** 20) * 10) / 10,
    rss: Math.round((m.rss / 2 ** 20) * 10) / 10,
  };
}
