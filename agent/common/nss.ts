/**
 * Users and groups through NSS, as `getent(1)` sees them: /etc/passwd and /etc/group, and
 * also LDAP, sssd or systemd-userdb when nsswitch.conf(5) names them (parsing the files by
 * hand finds only the first). getent is run with an argument array (no shell) and a
 * timeout, since a remote directory can hang.
 *
 * Exit codes (getent(1)): 0 found, 2 not found, anything else the database could not be read.
 */
import { execFileSync } from 'node:child_process';
import { NestError } from './errors';

/** How long one look-up may take before it counts as a failure of the database. */
export const NSS_TIMEOUT_MS = 5_000;

export interface UserEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

export interface GroupEntry {
  name: string;
  gid: number;
}

/** `getent DB KEY`'s line, or null when the key is not there (exit 2). */
function getent(db: 'passwd' | 'group', key: string, field: string): string | null {
  try {
    return execFileSync('getent', [db, key], {
      encoding: 'utf8',
      timeout: NSS_TIMEOUT_MS,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { status?: number | null; signal?: string | null };
    if (e.status === 2) return null;
    const why =
      e.code === 'ENOENT'
        ? 'getent is not installed'
        : e.signal
          ? `getent did not answer within ${NSS_TIMEOUT_MS / 1000} s`
          : `getent ${db} exited ${String(e.status)}`;
    throw new NestError(
      'NSS_LOOKUP',
      `${field}: ${JSON.stringify(key)} could not be looked up: ${why}`,
      {
        problems: [{ field, value: key, message: why }],
        cause: err,
      },
    );
  }
}

function unknown(field: string, what: 'user' | 'group', key: string | number): NestError {
  const message = `no ${what} ${JSON.stringify(key)} (looked up through NSS: getent ${what === 'user' ? 'passwd' : 'group'})`;
  return new NestError('CONFIG_INVALID', `${field}: ${message}`, {
    problems: [{ field, value: key, message }],
  });
}

/**
 * A user by name or uid. `field` names where the value came from (`projects[0].command.user`)
 * for the error. Unknown → CONFIG_INVALID naming the field; the database unreadable →
 * NSS_LOOKUP.
 */
export function lookupUser(user: string | number, field: string): UserEntry {
  const line = getent('passwd', String(user), field);
  if (line === null) throw unknown(field, 'user', user);
  // name:password:uid:gid:gecos:home:shell (passwd(5)); the first line is the match.
  const f = line.split('\n')[0].split(':');
  return { name: f[0], uid: Number(f[2]), gid: Number(f[3]), home: f[5] ?? '' };
}

/** A group by name or gid; errors as lookupUser's. */
export function lookupGroup(group: string | number, field: string): GroupEntry {
  const line = getent('group', String(group), field);
  if (line === null) throw unknown(field, 'group', group);
  // name:password:gid:members (group(5)).
  const f = line.split('\n')[0].split(':');
  return { name: f[0], gid: Number(f[2]) };
}
