/**
 * The guest's end of the channel to the host broker (config `upstream`), with the Client
 * role on it. The guest is always the server end: the host connects (virtio-serial port,
 * unix socket for local runs and the demo, or mutual TLS).
 */
import type { Logger } from '../common/log';
import { NestError } from '../common/errors';
import type { Hello, PlanRequest, PlanResult } from '../protocol/messages';
import type { Channel } from '../transport/channel';
import { promises as fsp } from 'node:fs';
import { UnixChannelServer } from '../transport/unix';
import { TlsChannelServer } from '../transport/tls';
import { VirtioSerialChannel } from '../transport/virtio-serial';
import { Client } from '../client/client';
import type { NoticeBook } from '../client/notices';
import type { GuestConfig } from './config';
import { readGuestFacts, factPathsFromEnv } from './guest-facts';

export interface Upstream {
  connected(): boolean;
  close(): Promise<void>;
}

export async function openUpstream(
  cfg: GuestConfig,
  book: NoticeBook,
  inventory: () => Promise<Hello['inventory']>,
  log: Logger,
  plan?: (req: PlanRequest) => Promise<Omit<PlanResult, 'type' | 'id' | 'replyTo'>>,
): Promise<Upstream | null> {
  const up = cfg.upstream;
  let channel: Channel;
  // The Client answers pings itself (ping → pong is part of its role at every level).
  const opts = {
    log,
    answerPings: false,
    rateLimit: { perSecond: cfg.limits.messagesPerSecond, burst: cfg.limits.messageBurst },
  };
  switch (up.transport) {
    case 'none':
      return null;
    case 'unix':
      channel = await UnixChannelServer.listen(up.path, opts);
      break;
    case 'virtio-serial':
      // Opens the port in the background: the device may appear after we start.
      channel = VirtioSerialChannel.open({ ...opts, path: up.path });
      break;
    case 'tls': {
      const [cert, key, ca] = await Promise.all(
        [up.tls.cert, up.tls.key, up.tls.ca].map((f) => fsp.readFile(f)),
      );
      channel = await TlsChannelServer.listen({
        ...opts,
        host: up.listen.host,
        port: up.listen.port,
        cert,
        key,
        ca,
      });
      break;
    }
    default:
      throw new NestError(
        'CONFIG_INVALID',
        `upstream.transport ${JSON.stringify((up as { transport: string }).transport)} is unknown`,
      );
  }
  // The kernel's online CPUs and MemTotal go with the hello and every outcome, and in a
  // `facts` message when they change (guest-facts.ts; docs/protocol.md, "facts (guest → host)").
  const factPaths = factPathsFromEnv();
  const client = new Client({
    channel,
    book,
    inventory,
    plan,
    log,
    facts: () => readGuestFacts(factPaths),
  });
  if (channel.connected) client.opened();
  return {
    connected: () => channel.connected,
    close: () => channel.close(),
  };
}
