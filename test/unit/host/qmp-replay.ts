/**
 * A fake QEMU: a real unix socket server that replays a recorded QMP conversation
 * (test/fixtures/qmp/*.jsonl, format in that folder's README) and records every command
 * the client sent, so a test can assert what the host broker asked QEMU to do.
 */
import { promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

type Step =
  | { send: unknown }
  | { expect: Record<string, unknown>; reply: Record<string, unknown>; repeat?: boolean };

export interface QmpReplay {
  socketPath: string;
  /** Every command received, without its id. */
  received: Record<string, unknown>[];
  /** Problems found (an unexpected command); empty when the client followed the script. */
  mismatches: string[];
  close(): Promise<void>;
}

export const FIXTURES = path.join(__dirname, '..', '..', 'fixtures', 'qmp');

export async function startQmpReplay(fixture: string): Promise<QmpReplay> {
  const text = await fs.readFile(path.join(FIXTURES, fixture), 'utf8');
  const steps = text
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as Step);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-qmp-'));
  const socketPath = path.join(dir, 'qmp.sock');
  const received: Record<string, unknown>[] = [];
  const mismatches: string[] = [];
  const sockets = new Set<net.Socket>();

  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => undefined);
    let i = 0;
    let buf = '';
    // Send every unprompted line up to the next expected command.
    const flush = (): void => {
      while (i < steps.length && 'send' in steps[i]) {
        sock.write(JSON.stringify((steps[i] as { send: unknown }).send) + '\r\n');
        i++;
      }
    };
    flush();
    sock.on('data', (chunk) => {
      buf += chunk.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as Record<string, unknown>;
        const { id, ...rest } = cmd;
        received.push(rest);
        const step = steps[i] as Extract<Step, { expect: unknown }> | undefined;
        if (!step || !('expect' in step)) {
          mismatches.push(`unexpected command ${line}`);
          sock.write(
            JSON.stringify({ error: { class: 'CommandNotFound', desc: 'not in the script' }, id }) +
              '\r\n',
          );
          continue;
        }
        if (JSON.stringify(rest) !== JSON.stringify(step.expect))
          mismatches.push(`expected ${JSON.stringify(step.expect)}, got ${JSON.stringify(rest)}`);
        sock.write(JSON.stringify({ ...step.reply, id }) + '\r\n');
        if (!step.repeat) i++;
        flush();
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  return {
    socketPath,
    received,
    mismatches,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}
