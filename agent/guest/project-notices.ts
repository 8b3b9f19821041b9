/**
 * Project notices (docs/guest-agent.md): before anything is taken from a
 * project, its notice (the original notice inside) is
 *   - written atomically to `<runDir>/projects/<name>/notice.json` (temp file, rename),
 *   - sent, where the project's config names a `notify.signal`, as that signal to every
 *     process of the project's cgroup (read at the moment of signalling: never a stale pid),
 *   - pushed as a JSON line to every process of that project connected to the project socket.
 *
 * The project socket speaks one JSON value a line (docs/project-protocol.md specifies it):
 *   project → {"type":"hello","project":"web","token":"<contents of token file>"}
 *   agent   → {"type":"welcome","project":"web"} then {"type":"notice","notice":ProjectNotice}*
 *   project → {"type":"done","noticeId":"..."}      (ends its grace period early)
 *   agent   → {"type":"ack","noticeId":"..."} | {"type":"error","message":"..."}
 * The token (`<runDir>/projects/<name>/token`, readable by the project's user only) proves
 * the connection belongs to that project: another project cannot end someone else's grace.
 */
import { randomBytes } from 'node:crypto';
import {
  promises as fsp,
  constants,
  existsSync,
  mkdirSync,
  renameSync,
  writeFileSync,
} from 'node:fs';
import net from 'node:net';
import * as path from 'node:path';
import type { Logger } from '../common/log';
import type { ProjectNotice } from '../broker/types';
import { LineDecoder, encode } from '../protocol/framing';
import { MAX_PROJECT_LINE_BYTES } from '../protocol/project-schemas';

interface Subscriber {
  sock: net.Socket;
  project: string;
}

export class ProjectNoticeBoard {
  private server: net.Server | null = null;
  private readonly subs = new Set<Subscriber>();
  private readonly tokens = new Map<string, string>();
  /** Latest notice per project, sent to a process that connects later. */
  private readonly current = new Map<string, ProjectNotice>();
  /** `${project}\n${noticeId}` pairs a project has answered `done` for. */
  private readonly done = new Set<string>();
  private readonly doneWaiters = new Map<string, Set<() => void>>();

  constructor(
    private readonly runDir: string,
    private readonly socketPath: string | undefined,
    private readonly log: Logger,
  ) {}

  dir(project: string): string {
    return path.join(this.runDir, 'projects', project);
  }

  /** Creates the project's run dir and its token; the project's user owns both. */
  async prepare(project: string, owner?: { uid: number; gid: number }): Promise<void> {
    const dir = this.dir(project);
    await fsp.mkdir(dir, { recursive: true, mode: 0o750 });
    const tokenFile = path.join(dir, 'token');
    let token: string;
    try {
      token = (await fsp.readFile(tokenFile, 'utf8')).trim();
    } catch {
      token = randomBytes(18).toString('base64url');
      await writeAtomic(tokenFile, `${token}\n`, 0o600);
    }
    if (owner) {
      await fsp.chown(dir, owner.uid, owner.gid);
      await fsp.chown(tokenFile, owner.uid, owner.gid);
    }
    this.tokens.set(project, token);
  }

  async listen(): Promise<void> {
    if (!this.socketPath) return;
    await fsp.mkdir(path.dirname(this.socketPath), { recursive: true, mode: 0o755 });
    await fsp.rm(this.socketPath, { force: true });
    const server = net.createServer((sock) => this.serve(sock));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    // Any local user may connect: the token is what proves which project it speaks for.
    await fsp.chmod(this.socketPath, 0o666);
    this.server = server;
  }

  async close(): Promise<void> {
    for (const s of this.subs) s.sock.destroy();
    this.subs.clear();
    const server = this.server;
    this.server = null;
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    if (this.socketPath) await fsp.rm(this.socketPath, { force: true });
  }

  /**
   * Delivers a project notice: file first (durable), then the socket, then the signal to
   * each pid in `pids` (the group's list read by the caller just now).
   */
  async deliver(pn: ProjectNotice, notify: { signal?: string; pids: number[] }): Promise<void> {
    const dir = this.dir(pn.project);
    if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o750 });
    // Replaced atomically (a reader sees the old or the new file, whole) but not fsync'd:
    // what makes the delivery durable is the broker's step record, and a notice not yet
    // recorded as delivered is delivered again after a crash (docs/performance.md: one
    // fsync'd file per project, ×2 with the directory, was most of the cost of the
    // notices). Written synchronously: a small file in a directory of its own, with no
    // fsync, does not wait on the disk, and the broker calls deliver for every project
    // in one loop, so the hundred notices of a reclaim are written in one go and their
    // deliveries recorded by one journal write, where four round trips each through the
    // thread pool (open, write, close, rename) queued behind the journal's fsyncs
    // (docs/performance.md, "Closing the gap to the kernel's floor").
    writeReplaceNow(path.join(dir, 'notice.json'), `${JSON.stringify(pn, null, 2)}\n`, 0o644);
    this.current.set(pn.project, pn);
    for (const s of this.subs) if (s.project === pn.project) this.write(s.sock, noticeLine(pn));
    if (notify.signal) {
      for (const pid of notify.pids) {
        try {
          process.kill(pid, notify.signal as NodeJS.Signals);
        } catch (err) {
          // ESRCH: it exited between the read of cgroup.procs and now; nothing to tell.
          if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
        }
      }
    }
  }

  hasAnsweredDone(project: string, noticeId: string): boolean {
    return this.done.has(`${project}\n${noticeId}`);
  }

  /** Resolves when the project answers `done` for this notice; never rejects. */
  waitDone(project: string, noticeId: string, signal: AbortSignal): Promise<boolean> {
    const key = `${project}\n${noticeId}`;
    if (this.done.has(key)) return Promise.resolve(true);
    return new Promise<boolean>((resolve) => {
      const set = this.doneWaiters.get(key) ?? new Set();
      this.doneWaiters.set(key, set);
      const fire = (): void => {
        set.delete(fire);
        signal.removeEventListener('abort', abort);
        resolve(true);
      };
      const abort = (): void => {
        set.delete(fire);
        resolve(false);
      };
      set.add(fire);
      if (signal.aborted) abort();
      else signal.addEventListener('abort', abort, { once: true });
    });
  }

  private serve(sock: net.Socket): void {
    const decoder = new LineDecoder(MAX_PROJECT_LINE_BYTES);
    let sub: Subscriber | null = null;
    sock.on('error', () => undefined);
    sock.on('close', () => {
      if (sub) this.subs.delete(sub);
    });
    sock.on('data', (chunk: Buffer) => {
      for (const ev of decoder.push(chunk)) {
        // A 0xFF only drops a partial line, as on the host channel (docs/project-protocol.md).
        if (ev.kind === 'resync') continue;
        if (ev.kind !== 'line') {
          this.write(sock, { type: 'error', message: `unreadable line (${ev.kind})` });
          continue;
        }
        let msg: { type?: unknown; project?: unknown; token?: unknown; noticeId?: unknown };
        try {
          msg = JSON.parse(ev.line);
        } catch {
          this.write(sock, { type: 'error', message: 'line is not JSON' });
          continue;
        }
        if (msg === null || typeof msg !== 'object') msg = {};
        if (msg.type === 'hello') {
          const project = typeof msg.project === 'string' ? msg.project : '';
          const token = this.tokens.get(project);
          if (!token || msg.token !== token) {
            this.write(sock, {
              type: 'error',
              message: `unknown project ${JSON.stringify(msg.project)} or wrong token (read ${this.runDir}/projects/<name>/token)`,
            });
            continue;
          }
          if (sub) this.subs.delete(sub);
          sub = { sock, project };
          this.subs.add(sub);
          this.write(sock, { type: 'welcome', project });
          const pn = this.current.get(project);
          if (pn) this.write(sock, noticeLine(pn));
        } else if (msg.type === 'done') {
          if (!sub) {
            this.write(sock, {
              type: 'error',
              message: 'say hello with your project and token first',
            });
            continue;
          }
          if (typeof msg.noticeId !== 'string') {
            this.write(sock, { type: 'error', message: 'done needs a string noticeId' });
            continue;
          }
          const key = `${sub.project}\n${msg.noticeId}`;
          this.done.add(key);
          this.log.info({ noticeId: msg.noticeId, project: sub.project }, 'project answered done');
          for (const fire of [...(this.doneWaiters.get(key) ?? [])]) fire();
          this.write(sock, { type: 'ack', noticeId: msg.noticeId });
        } else {
          this.write(sock, {
            type: 'error',
            message: `unknown message type ${JSON.stringify(msg.type)} (hello | done)`,
          });
        }
      }
    });
  }

  private write(sock: net.Socket, value: object): void {
    if (!sock.destroyed && sock.writable) sock.write(encode(value, 64 * 1024));
  }
}

function noticeLine(pn: ProjectNotice): object {
  return { type: 'notice', notice: pn };
}

/** Temp file, rename: a reader sees the old or the new file, whole (not made durable). */
function writeReplaceNow(file: string, text: string, mode: number): void {
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, text, { mode });
  renameSync(tmp, file);
}

/** Temp file, fsync, rename, fsync the directory: a reader sees the old or the new file, whole. */
export async function writeAtomic(file: string, text: string, mode: number): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  const fh = await fsp.open(tmp, constants.O_CREAT | constants.O_TRUNC | constants.O_WRONLY, mode);
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, file);
  const dh = await fsp.open(path.dirname(file), constants.O_RDONLY);
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}
