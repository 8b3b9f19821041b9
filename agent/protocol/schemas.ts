/**
 * zod schemas for every message of messages.ts and for Notice/Outcome of broker/types.ts:
 * the boundary check of the host↔guest channel (docs/protocol.md: every message is
 * validated by schema; an invalid line gets an `error` reply that names what was wrong).
 *
 * Every object is strict (an unknown field is an error, not silently dropped: a peer on
 * another version should hear about it), every number finite, non-negative and bounded,
 * every string and array bounded. Nesting depth and total size are bounded by the 64 KiB
 * line cap before JSON.parse ever runs (framing.ts).
 *
 * These schemas are the one source of the protocol: the TypeScript types of messages.ts
 * and broker/types.ts are `z.infer` of them, and the JSON Schemas of docs/schemas/ are
 * generated from them (`make schemas`; test/unit/protocol/json-schemas.test.ts checks that
 * the published ones are in step). The `.describe()` texts become their descriptions.
 */
import { z } from 'zod';
import type { ErrorCode, Problem } from '../common/errors';

export const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;
export const MAX_PROJECTS = 10_000;
export const MAX_CPUS = 4096;
export const MAX_REASON = 1024;
export const MAX_ERROR_MESSAGE = 4096;
/** Problems listed in one error reply (the rest are counted in its message). */
export const MAX_PROBLEMS = 20;
/**
 * The latest a notice's deadline may be after it arrives (docs/protocol.md, "Deadlines").
 * Node's timers fire AT ONCE for a delay over 2³¹−1 ms (24.8 days): a deadline weeks
 * ahead made every step of a notice time out in its first millisecond. A day is far more
 * than any reclaim needs, and well inside what a timer can wait.
 */
export const MAX_DEADLINE_AHEAD_MS = 24 * 60 * 60 * 1000;
/** A capability name (docs/protocol.md, "Versions and capabilities"). */
export const CAPABILITY_PATTERN = /^[a-z][a-z0-9-]{0,63}$/;
export const MAX_CAPABILITIES = 32;

const id = z.string().regex(ID_PATTERN, 'must be 1–128 of [A-Za-z0-9_.:-], starting alphanumeric');
const name = id;
const bytes = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const cpus = z.number().finite().nonnegative().max(MAX_CPUS);
const ms = z.number().finite().nonnegative().max(Number.MAX_SAFE_INTEGER);
const seq = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const isoDate = z.string().max(64).datetime({ offset: true });
const reason = z.string().max(MAX_REASON);
const errorCode = z.string().min(1).max(64);
const errorBody = z
  .object({ code: errorCode, message: z.string().max(MAX_ERROR_MESSAGE) })
  .strict();

export const ResourcesSchema = z.object({ cpus, memoryBytes: bytes }).strict();

/**
 * CPU numbers as the kernel counts them (0 … MAX_CPUS−1), strictly ascending (so each at
 * most once, and one spelling of each set): `leavingCpus` of a notice, `onlineCpus` of a
 * hello or outcome (docs/protocol.md, "Types of values").
 */
export const CpuListSchema = z
  .array(
    z
      .number()
      .int()
      .nonnegative()
      .max(MAX_CPUS - 1),
  )
  .max(MAX_CPUS)
  .refine((a) => a.every((c, i) => i === 0 || c > a[i - 1]), {
    message: 'must be CPU numbers in strictly ascending order',
  });

export const NoticeSchema = z
  .object({
    id,
    guest: name,
    seq,
    kind: z.enum(['reclaim', 'restore']),
    change: ResourcesSchema,
    allocation: ResourcesSchema,
    deadline: isoDate,
    reason,
    issuedAt: isoDate,
    leavingCpus: CpuListSchema.describe(
      'reclaim only: the guest CPUs the host will unplug; sent only to a guest that listed the capability cpu-unplug',
    ).optional(),
  })
  .strict();

const projectAction = z.enum(['unchanged', 'shrunk', 'stopped', 'grown', 'started']);
const exitKind = z.enum(['graceful', 'killed', 'already-gone', 'timeout', 'escaped']);

export const ProjectLimitsSchema = z
  .object({
    memoryHigh: z.union([bytes, z.literal('max')]),
    memoryMax: z.union([bytes, z.literal('max')]),
    cpuMax: z.union([cpus, z.literal('max')]),
    // A cpuset list as the kernel prints it: "0-3,8".
    cpuset: z
      .string()
      .max(1024)
      .regex(/^[0-9,-]*$/, 'must be a CPU list like "0-3,8"')
      .optional(),
  })
  .strict();

export const ProjectOutcomeSchema = z
  .object({
    name,
    action: projectAction,
    before: ProjectLimitsSchema,
    after: ProjectLimitsSchema,
    exit: exitKind.nullable(),
    ms,
    reason,
    error: errorBody.optional(),
    escaped: z.array(z.number().int().min(1).max(4_194_304)).max(4096).optional(),
  })
  .strict();

export const OutcomeSchema = z
  .object({
    noticeId: id,
    guest: name,
    status: z.enum(['complete', 'partial', 'failed']),
    projects: z.array(ProjectOutcomeSchema).max(MAX_PROJECTS),
    freed: ResourcesSchema,
    startedAt: isoDate,
    finishedAt: isoDate,
    ms,
  })
  .strict();

export const InventoryProjectSchema = z
  .object({
    name,
    // Priorities are the guest operator's ranking; they may be below zero.
    priority: z.number().finite().min(-1_000_000).max(1_000_000),
    state: z.enum(['running', 'stopped', 'starting', 'stopping', 'failed']),
  })
  .strict();

const version = z
  .number()
  .int()
  .min(1)
  .max(1_000_000)
  .describe('the protocol version the sender speaks; both peers must speak the same');
/**
 * Optional features the sender implements (docs/protocol.md, "Versions and capabilities").
 * Absent means none. A name the receiver does not know is ignored, never an error, so a
 * newer peer can list features an older one has never heard of.
 */
const capabilities = z
  .array(z.string().regex(CAPABILITY_PATTERN, 'must be 1–64 of [a-z0-9-], starting a-z'))
  .max(MAX_CAPABILITIES)
  .describe('optional features the sender implements; unknown names are ignored')
  .optional();

export const HelloSchema = z
  .object({
    type: z.literal('hello'),
    id,
    version,
    guest: name,
    inventory: z
      .object({
        cpus,
        memoryBytes: bytes,
        projects: z.array(InventoryProjectSchema).max(MAX_PROJECTS),
      })
      .strict(),
    lastSeq: seq.describe('highest notice seq this guest has accepted (from its journal), or 0'),
    capabilities,
    onlineCpus: CpuListSchema.describe(
      'the CPUs online in the guest now (/sys/devices/system/cpu/online)',
    ).optional(),
    memTotal: bytes.describe('MemTotal of the guest now, in bytes (/proc/meminfo)').optional(),
  })
  .strict()
  .describe('guest → host, first message of every connection');

export const WelcomeSchema = z
  .object({
    type: z.literal('welcome'),
    id,
    replyTo: id,
    version,
    guest: name,
    heartbeatMs: z
      .number()
      .int()
      .nonnegative()
      .max(86_400_000)
      .describe('how often the host pings (0: never)'),
    capabilities,
    clock: ms
      .optional()
      .describe("the host's monotonic clock at send, ms (capability monotonic-clock)"),
  })
  .strict()
  .describe('host → guest, the answer to hello');

/**
 * The host's monotonic clock on a notice (capability monotonic-clock): its reading when the
 * message left and the deadline on the same clock. The guest converts the deadline once,
 * on receipt, to its own monotonic clock (docs/protocol.md, "Deadlines").
 */
export const SenderClockSchema = z
  .object({
    sent: ms.describe("the host's monotonic clock when the message left, ms"),
    deadline: ms.describe('the deadline on the same clock, ms'),
  })
  .strict();

export const NoticeMsgSchema = z
  .object({
    type: z.literal('notice'),
    id,
    notice: NoticeSchema,
    clock: SenderClockSchema.optional(),
  })
  .strict();
export const RestoreMsgSchema = z
  .object({
    type: z.literal('restore'),
    id,
    notice: NoticeSchema,
    clock: SenderClockSchema.optional(),
  })
  .strict();

export const AckSchema = z
  .object({
    type: z.literal('ack'),
    id,
    replyTo: id,
    noticeId: id,
    state: z.enum(['accepted', 'duplicate', 'rejected', 'cancelled', 'not-cancellable']),
    error: errorBody.optional(),
  })
  .strict();

export const ProgressSchema = z
  .object({
    type: z.literal('progress'),
    id,
    noticeId: id,
    project: name,
    phase: z.enum(['notified', 'shrunk', 'stopping', 'stopped', 'started', 'grown']),
    action: projectAction,
    exit: exitKind.nullable().optional(),
    ms,
  })
  .strict();

/** Parts one outcome may come in: at most one a project. */
export const MAX_OUTCOME_PARTS = MAX_PROJECTS;
const partCount = z.number().int().min(1).max(MAX_OUTCOME_PARTS);

export const OutcomeMsgSchema = z
  .object({
    type: z.literal('outcome'),
    id,
    outcome: OutcomeSchema,
    parts: partCount.optional(),
    onlineCpus: CpuListSchema.describe(
      'the CPUs online in the guest when it sent this; only to a host that listed cpu-unplug',
    ).optional(),
    memTotal: bytes
      .describe(
        'MemTotal of the guest when it sent this, in bytes; only to a host that listed cpu-unplug',
      )
      .optional(),
  })
  .strict();

/**
 * guest → host, unasked: the guest kernel's online CPUs and MemTotal changed since the
 * guest last sent them on this connection (docs/protocol.md, "facts (guest → host)"). Only
 * to a host whose welcome listed cpu-unplug: it is what confirms a vCPU unplug that
 * completes after the outcome.
 */
export const FactsMsgSchema = z
  .object({
    type: z.literal('facts'),
    id,
    onlineCpus: CpuListSchema.describe(
      'the CPUs online in the guest now (/sys/devices/system/cpu/online)',
    ).optional(),
    memTotal: bytes.describe('MemTotal of the guest now, in bytes (/proc/meminfo)').optional(),
  })
  .strict()
  .describe('guest → host, when the online CPUs or MemTotal changed');

export const OutcomePartSchema = z
  .object({
    type: z.literal('outcome-part'),
    id,
    noticeId: id,
    index: z
      .number()
      .int()
      .nonnegative()
      .max(MAX_OUTCOME_PARTS - 1),
    count: partCount,
    projects: z.array(ProjectOutcomeSchema).min(1).max(MAX_PROJECTS),
  })
  .strict();

export const CancelSchema = z.object({ type: z.literal('cancel'), id, noticeId: id }).strict();

export const PlanRequestSchema = z
  .object({
    type: z.literal('plan'),
    id,
    kind: z.enum(['reclaim', 'restore']),
    allocation: ResourcesSchema,
  })
  .strict();

export const PlanProjectSchema = z
  .object({
    project: name,
    priority: z.number().finite().min(-1_000_000).max(1_000_000),
    action: projectAction,
    before: ProjectLimitsSchema,
    after: ProjectLimitsSchema,
    mustComeDownFrom: bytes.optional(),
    reason,
  })
  .strict();

export const PlanResultSchema = z
  .object({
    type: z.literal('plan-result'),
    id,
    replyTo: id,
    allocation: ResourcesSchema,
    projectAllocation: ResourcesSchema,
    fits: z.boolean(),
    reasons: z.array(reason).max(100),
    projects: z.array(PlanProjectSchema).max(MAX_PROJECTS),
    omitted: z.number().int().nonnegative().max(MAX_PROJECTS).optional(),
  })
  .strict();

export const PingSchema = z.object({ type: z.literal('ping'), id, t: ms }).strict();
export const PongSchema = z.object({ type: z.literal('pong'), id, replyTo: id, t: ms }).strict();

export const ErrorMsgSchema = z
  .object({
    type: z.literal('error'),
    id,
    replyTo: id.optional(),
    code: errorCode,
    message: z.string().max(MAX_ERROR_MESSAGE),
    problems: z
      .array(z.object({ field: z.string().max(256), message: z.string().max(1024) }).strict())
      .max(MAX_PROBLEMS)
      .optional(),
  })
  .strict();

export const MessageSchema = z
  .discriminatedUnion('type', [
    HelloSchema,
    WelcomeSchema,
    NoticeMsgSchema,
    RestoreMsgSchema,
    AckSchema,
    ProgressSchema,
    OutcomeMsgSchema,
    OutcomePartSchema,
    FactsMsgSchema,
    CancelSchema,
    PlanRequestSchema,
    PlanResultSchema,
    PingSchema,
    PongSchema,
    ErrorMsgSchema,
  ])
  .superRefine((m, ctx) => {
    // A `notice` message carries a reclaim, a `restore` message a restore: a mismatch
    // would let one path act on the other's intent.
    const want = m.type === 'notice' ? 'reclaim' : m.type === 'restore' ? 'restore' : null;
    if (want !== null && 'notice' in m && m.notice.kind !== want) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['notice', 'kind'],
        message: `a ${m.type} message must carry kind "${want}"`,
      });
    }
    // Only a reclaim takes CPUs away: a restore naming leaving CPUs is a confused sender.
    if (m.type === 'restore' && m.notice.leavingCpus !== undefined) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['notice', 'leavingCpus'],
        message: 'only a reclaim names leaving CPUs',
      });
    }
    if (m.type === 'outcome-part' && m.index >= m.count) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['index'],
        message: `must be below count ${m.count}, got ${m.index}`,
      });
    }
    // Parts carry the projects; the summary must not carry them too (which would count twice).
    if (m.type === 'outcome' && m.parts !== undefined && m.outcome.projects.length > 0) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        path: ['outcome', 'projects'],
        message: `must be empty when the outcome comes in ${m.parts} parts, got ${m.outcome.projects.length} projects`,
      });
    }
  });

type Message = z.infer<typeof MessageSchema>;
type ErrorMsg = z.infer<typeof ErrorMsgSchema>;

export const MESSAGE_TYPES = MessageSchema.innerType().options.map(
  (o) => o.shape.type.value,
) as Message['type'][];

/**
 * A Problem as a protocol `error` carries it: field and message, not the value (which may be
 * what made the line too long or hostile to echo back).
 */
export type ProtocolProblem = Omit<Problem, 'value'>;

export interface ParseFailure {
  code: ErrorCode;
  message: string;
  problems: ProtocolProblem[];
  /** The offending message's id when it had a usable one, for the reply's `replyTo`. */
  replyTo?: string;
  /** The `type` it claimed, when a string (a bad `error` message gets no error reply). */
  type?: string;
}

export type ParseResult = { ok: true; msg: Message } | { ok: false; error: ParseFailure };

/**
 * The messages parseMessage has returned: a receiver handed one of these by its channel
 * (agent/transport/channel.ts validates every line where it arrives) need not validate it
 * again. Weak: it holds no message alive.
 */
const parsed = new WeakSet<object>();

/** Whether `msg` is a Message that parseMessage returned (validated where it arrived). */
export function isParsedMessage(msg: unknown): msg is Message {
  return typeof msg === 'object' && msg !== null && parsed.has(msg);
}

/** JSON text of one line → a validated Message, or every problem found, each naming its field. */
export function parseMessage(line: string): ParseResult {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch (err) {
    return fail(`line is not JSON (${(err as Error).message}), got ${preview(line)}`, [
      { field: '(line)', message: `not JSON, got ${preview(line)}` },
    ]);
  }
  const replyTo = usableId(raw);
  const result = MessageSchema.safeParse(raw);
  if (result.success) {
    parsed.add(result.data);
    return { ok: true, msg: result.data };
  }
  const problems = result.error.issues.map((issue) => describeIssue(issue, raw));
  const type = typeOf(raw);
  const shown = problems.slice(0, MAX_PROBLEMS);
  const more =
    problems.length > shown.length ? ` (and ${problems.length - shown.length} more)` : '';
  const message = clip(
    `invalid ${type ? `"${type}" message` : 'message'}: ${shown.map((p) => `${p.field}: ${p.message}`).join('; ')}${more}`,
    MAX_ERROR_MESSAGE,
  );
  const failure = fail(message, shown, replyTo);
  const claimed = claimedType(raw);
  if (!failure.ok && claimed !== undefined) failure.error.type = claimed;
  return failure;
}

/** The `error` reply for a failure (parse, oversize line, bad UTF-8), fit for `send`. */
export function errorReply(failure: ParseFailure, id: string): ErrorMsg {
  const reply: ErrorMsg = {
    type: 'error',
    id,
    code: failure.code,
    message: clip(failure.message, MAX_ERROR_MESSAGE),
  };
  if (failure.replyTo !== undefined) reply.replyTo = failure.replyTo;
  if (failure.problems.length > 0) {
    reply.problems = failure.problems.slice(0, MAX_PROBLEMS).map((p) => ({
      field: clip(p.field, 256),
      message: clip(p.message, 1024),
    }));
  }
  return reply;
}

function fail(message: string, problems: ProtocolProblem[], replyTo?: string): ParseResult {
  const error: ParseFailure = { code: 'PROTOCOL_INVALID', message, problems };
  if (replyTo !== undefined) error.replyTo = replyTo;
  return { ok: false, error };
}

function describeIssue(issue: z.ZodIssue, raw: unknown): ProtocolProblem {
  const field = formatPath(issue.path);
  if (issue.code === z.ZodIssueCode.invalid_union_discriminator) {
    return {
      field,
      message: `must be one of ${MESSAGE_TYPES.join(', ')}, got ${preview(valueAt(raw, issue.path))}`,
    };
  }
  if (issue.code === z.ZodIssueCode.unrecognized_keys) {
    return {
      field,
      message: `unknown field(s) ${issue.keys.map((k) => `"${clip(k, 64)}"`).join(', ')}`,
    };
  }
  const value = valueAt(raw, issue.path);
  const got = value === MISSING ? 'missing' : `got ${preview(value)}`;
  return { field, message: `${issue.message.toLowerCase()}, ${got}` };
}

const MISSING = Symbol('missing');

function valueAt(raw: unknown, p: (string | number)[]): unknown {
  let v: unknown = raw;
  for (const k of p) {
    if (v === null || typeof v !== 'object' || !(k in v)) return MISSING;
    v = (v as Record<string | number, unknown>)[k];
  }
  return v;
}

/** `notice.change.cpus`, `inventory.projects[3].name`; '(message)' for the whole. */
function formatPath(p: (string | number)[]): string {
  if (p.length === 0) return '(message)';
  let out = '';
  for (const k of p) out += typeof k === 'number' ? `[${k}]` : out ? `.${k}` : k;
  return clip(out, 256);
}

/**
 * At most 80 characters of a value, for an error message. Written out only as far as
 * shown: JSON.stringify of a whole 64 KiB value to keep 80 characters of it was the
 * largest cost of answering a bad line under the fuzz (test/fuzz), and it recursed, so
 * JSON nested some 10 000 deep (which fits in a line) overflowed the stack. Here every
 * level adds at least one character, so the depth is bounded by the width too.
 */
function preview(v: unknown, n = 80): string {
  if (v === MISSING) return 'nothing';
  const out: string[] = [];
  let len = 0;
  const put = (s: string): boolean => {
    out.push(s);
    len += s.length;
    return len <= n;
  };
  const walk = (x: unknown): boolean => {
    if (typeof x === 'string') return put(JSON.stringify(x.length > n ? x.slice(0, n) : x));
    if (x === null || typeof x !== 'object') return put(JSON.stringify(x) ?? String(x));
    if (Array.isArray(x)) {
      if (!put('[')) return false;
      for (let i = 0; i < x.length; i++) if ((i > 0 && !put(',')) || !walk(x[i])) return false;
      return put(']');
    }
    if (!put('{')) return false;
    let first = true;
    for (const k of Object.keys(x)) {
      if (!first && !put(',')) return false;
      first = false;
      if (!put(`${JSON.stringify(k.length > n ? k.slice(0, n) : k)}:`)) return false;
      if (!walk((x as Record<string, unknown>)[k])) return false;
    }
    return put('}');
  };
  walk(v);
  return clip(out.join(''), n);
}

function clip(s: string, n: number): string {
  return s.length <= n ? s : s.slice(0, n - 1) + '…';
}

function typeOf(raw: unknown): string | null {
  if (raw !== null && typeof raw === 'object' && 'type' in raw) {
    const t = (raw as { type: unknown }).type;
    if (typeof t === 'string' && (MESSAGE_TYPES as string[]).includes(t)) return t;
  }
  return null;
}

function claimedType(raw: unknown): string | undefined {
  if (raw !== null && typeof raw === 'object' && 'type' in raw) {
    const t = (raw as { type: unknown }).type;
    if (typeof t === 'string') return clip(t, 64);
  }
  return undefined;
}

function usableId(raw: unknown): string | undefined {
  if (raw !== null && typeof raw === 'object' && 'id' in raw) {
    const v = (raw as { id: unknown }).id;
    if (typeof v === 'string' && ID_PATTERN.test(v)) return v;
  }
  return undefined;
}
