/**
 * Coded errors of the cgroup layer. Callers branch on `code` (and `errno`), never on the
 * message text (CONTRIBUTING.md). The message still carries the file, the data written and
 * the errno, because "having data in the error message helps in debugging" (runc).
 * docs/errors.md "CgroupError codes" has a row for each code (a test keeps them in step).
 */

export const CgroupErrorCodes = {
  NAME_INVALID: 'a group name or path failed the name rules',
  OUTSIDE_ROOT: 'a path resolved outside the claimed root',
  LIMIT_INVALID: 'a limit value is outside what the kernel accepts',
  PARSE_FAILED: 'a cgroup file held text we could not parse',
  ESRCH: 'the process does not exist (any more)',
  EBUSY: 'the kernel refused because the group is busy (populated, or has children)',
  ENOENT: 'the group or interface file does not exist',
  EINVAL: 'the kernel rejected the value',
  TIMEOUT: 'the group did not reach the awaited state in time',
  UNSUPPORTED: 'this driver or kernel cannot do that',
  WRITE_FAILED: 'writing a cgroup file failed',
  READ_FAILED: 'reading a cgroup file failed',
  NOT_DETECTED: 'no usable cgroup layout was found',
} as const;

export type CgroupErrorCode = keyof typeof CgroupErrorCodes;

export interface CgroupErrorOptions {
  /** Absolute path of the cgroup file or directory involved. */
  file?: string;
  /** What we tried to write. */
  data?: string;
  /** `EBUSY`, `ESRCH`, ... as Node reports it (`err.code`). */
  errno?: string;
  cause?: unknown;
  /** For refused names and values: which field, and what was received. */
  field?: string;
  value?: unknown;
  /** Every problem found, when one check found several (all reported at once). */
  problems?: Problem[];
}

/**
 * One problem found in an input, for every layer of nestbroker: a config file, an operator
 * argument, a protocol message, a limit value. agent/common/errors.ts re-exports this type
 * rather than declaring its own (this module depends on nothing of agent/).
 */
export interface Problem {
  /** Path of the field, e.g. `projects[1].memory.max`, `--memory`, `memory.max`. */
  field: string;
  /** What was received (left out of protocol replies, which carry field and message only). */
  value: unknown;
  message: string;
}

export class CgroupError extends Error {
  readonly code: CgroupErrorCode;
  readonly file?: string;
  readonly data?: string;
  readonly errno?: string;
  readonly field?: string;
  readonly value?: unknown;
  readonly problems: Problem[];

  constructor(code: CgroupErrorCode, message: string, opts: CgroupErrorOptions = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'CgroupError';
    this.code = code;
    this.file = opts.file;
    this.data = opts.data;
    this.errno = opts.errno;
    this.field = opts.field;
    this.value = opts.value;
    this.problems = opts.problems ?? [];
  }
}

export function isCgroupError(e: unknown, code?: CgroupErrorCode): e is CgroupError {
  return e instanceof CgroupError && (code === undefined || e.code === code);
}

/** `field must be ..., got "value"` (Node core style). */
export function invalidValue(
  code: 'NAME_INVALID' | 'OUTSIDE_ROOT' | 'LIMIT_INVALID',
  field: string,
  value: unknown,
  must: string,
): CgroupError {
  return new CgroupError(code, `${field} ${must}, got ${JSON.stringify(String(value))}`, {
    field,
    value,
  });
}

const ERRNO_CODES: Partial<Record<string, CgroupErrorCode>> = {
  ESRCH: 'ESRCH',
  EBUSY: 'EBUSY',
  ENOENT: 'ENOENT',
  EINVAL: 'EINVAL',
  // cpuset.cpus naming a CPU this machine lacks: the value is out of range.
  ERANGE: 'EINVAL',
  EOPNOTSUPP: 'UNSUPPORTED',
  ENOTSUP: 'UNSUPPORTED',
};

/** Wraps a failed fs call on cgroupfs, keeping file, data and errno. */
export function fromFsError(
  op: 'read' | 'write' | 'mkdir' | 'rmdir' | 'readdir' | 'watch',
  file: string,
  err: unknown,
  data?: string,
): CgroupError {
  const errno =
    typeof err === 'object' && err !== null && 'code' in err
      ? String((err as { code: unknown }).code)
      : undefined;
  const code: CgroupErrorCode =
    (errno && ERRNO_CODES[errno]) ||
    (op === 'read' || op === 'readdir' ? 'READ_FAILED' : 'WRITE_FAILED');
  const what = data === undefined ? '' : ` ${JSON.stringify(data)}`;
  return new CgroupError(code, `${op}${what} ${file} failed: ${errno ?? String(err)}`, {
    file,
    data,
    errno,
    cause: err,
  });
}
