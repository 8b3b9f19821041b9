/**
 * The error catalog: every error nestbroker raises carries a stable code, and callers
 * branch on the code, never on the message (CONTRIBUTING.md, fastify's FST_ERR_*).
 * docs/errors.md has a row for each code (meaning, nestctl's exit, what an operator does);
 * test/unit/repo/errors-doc.test.ts keeps the two in step both ways.
 */
import type { Problem } from '../../cgroup-adapter/errors';

export const ErrorCodes = {
  CONFIG_INVALID: 'config file failed validation',
  CONFIG_UNREADABLE: 'config file could not be read',
  INPUT_INVALID: 'a value given on the command line or the operator API is invalid',
  PROTOCOL_INVALID: 'a protocol message failed validation',
  PROTOCOL_OVERSIZE: 'a protocol line exceeded 64 KiB',
  PROTOCOL_VERSION: 'the peer speaks another protocol version',
  NOTICE_REJECTED: 'a notice does not fit the allocation books',
  NOTICE_STALE: 'a notice is older than one already applied',
  NOTICE_UNKNOWN: 'no notice has that id',
  NOTICE_BACKLOG: 'too many notices are pending; this one was refused, nothing done',
  ALLOCATION_MISMATCH:
    "a notice's allocation is not the guest's allocation minus (reclaim) or plus (restore) its change; refused, nothing done",
  LEAVING_CPUS_INVALID:
    "a reclaim's leavingCpus names CPUs that are not online in the guest, or would leave its projects none; refused, nothing done",
  STATE_LOCKED: 'another daemon holds the state directory; this one refused to start, nothing done',
  START_FAILED: 'a step of start-up failed; every earlier step was undone',
  GUEST_UNKNOWN: 'no guest has that name',
  GUEST_UNREACHABLE: 'the guest is not connected',
  GUEST_LATE: 'the guest did not answer by the deadline',
  PROJECT_UNKNOWN: 'no project has that name',
  PROJECT_STATE:
    "the project's state does not allow that now (a notice acts on it, or it waits for a restore); nothing done",
  JOURNAL_WRITE: 'the journal could not be written',
  QMP_ERROR: 'QEMU QMP returned an error',
  LIBVIRT_ERROR: 'a virsh call failed or timed out; its stderr is in the message',
  DOMAIN_DOWN: 'the libvirt domain is not running; refused, nothing done',
  DOMAIN_UNKNOWN: 'libvirt has no domain of that name',
  PREREQUISITE_MISSING:
    'the domain or host lacks what a removal mode needs (virsh, ACPI, hotpluggable vCPUs, a virtio-mem or balloon device, the channel); refused, nothing done',
  TIMEOUT: 'an operation did not finish in time',
  TRANSPORT: 'a channel to a peer failed',
  UNAUTHORIZED: 'the peer is not allowed',
  RATE_LIMITED: 'too many requests on one connection',
  AGENT_STOPPING: 'the agent is stopping; the notice is resumed from its journal at the next start',
  NSS_LOOKUP: 'the user or group database (getent, nsswitch.conf) could not be read',
  INTERNAL: 'an unexpected failure inside nestbroker (a bug: see the daemon log)',
} as const;

export type ErrorCode = keyof typeof ErrorCodes;

/**
 * One problem found in an input: one type for every layer. It lives in the lowest one,
 * the cgroup adapter (which depends on nothing of agent/), and is the same type here.
 */
export type { Problem } from '../../cgroup-adapter/errors';

export class NestError extends Error {
  readonly code: ErrorCode;
  readonly problems: Problem[];
  constructor(
    code: ErrorCode,
    message: string,
    opts: { problems?: Problem[]; cause?: unknown } = {},
  ) {
    super(message, { cause: opts.cause });
    this.name = 'NestError';
    this.code = code;
    this.problems = opts.problems ?? [];
  }
}

export function isNestError(e: unknown, code?: ErrorCode): e is NestError {
  return e instanceof NestError && (code === undefined || e.code === code);
}
