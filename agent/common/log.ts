/**
 * pino JSON logs to stdout (journald under systemd). Every line about a notice carries
 * `noticeId`: use `log.child({ noticeId })`.
 */
import pino, { type Logger } from 'pino';

export type { Logger };

export function createLogger(
  name: string,
  level = process.env.NESTBROKER_LOG_LEVEL ?? 'info',
): Logger {
  return pino({ name, level, base: { pid: process.pid, name } });
}

/** A logger that drops everything, for tests that assert on effects, not logs. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
