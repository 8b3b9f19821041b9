/**
 * Mutual TLS on 127.0.0.1: the host broker with the right client certificate is let in;
 * a plaintext client, a client with no certificate, one from another CA and an expired
 * one are refused before any protocol message crosses.
 */
import net from 'node:net';
import tls from 'node:tls';
import { TlsChannelServer, connectTls } from '../../../agent/transport/tls';
import { NestError } from '../../../agent/common/errors';
import { makeTestCerts, type TestCerts } from '../../helpers/tls-certs';
import { nextMessage, sleep } from './wait';

let certs: TestCerts;
let guest: TlsChannelServer;
let port: number;
let opens = 0;

beforeAll(() => {
  certs = makeTestCerts();
});
afterAll(() => certs.cleanup());

beforeEach(async () => {
  guest = await TlsChannelServer.listen({
    port: 0,
    cert: certs.server.cert,
    key: certs.server.key,
    ca: certs.ca,
  });
  port = guest.address().port;
  opens = 0;
  guest.on('open', () => opens++);
  guest.on('message', (m) => {
    if (m.type === 'cancel')
      guest.send({
        type: 'ack',
        id: 'a1',
        replyTo: m.id,
        noticeId: m.noticeId,
        state: 'cancelled',
      });
  });
});
afterEach(async () => {
  await guest.close();
});

const hostOpts = () => ({
  host: '127.0.0.1',
  port,
  cert: certs.client.cert,
  key: certs.client.key,
  ca: certs.ca,
  servername: 'localhost',
});

test('the host with a certificate from the CA talks to the guest both ways', async () => {
  const h = await connectTls(hostOpts());
  try {
    h.send({ type: 'ping', id: 'p1', t: 1 });
    expect(await nextMessage(h, 'pong')).toMatchObject({ replyTo: 'p1' });
    h.send({ type: 'cancel', id: 'c1', noticeId: 'n1' });
    expect(await nextMessage(h, 'ack')).toMatchObject({ replyTo: 'c1', state: 'cancelled' });
    expect(opens).toBe(1);
    expect(guest.refused).toBe(0);
  } finally {
    await h.close();
  }
});

async function expectRefused(opts: Parameters<typeof connectTls>[0]): Promise<NestError> {
  const err = (await connectTls(opts).catch((e) => e)) as NestError;
  expect(err).toBeInstanceOf(NestError);
  expect(['UNAUTHORIZED', 'TRANSPORT']).toContain(err.code);
  await sleep(20);
  expect(opens).toBe(0);
  return err;
}

test('a client without a certificate is refused', async () => {
  const { cert: _c, key: _k, ...noCert } = hostOpts();
  const err = await expectRefused(noCert as Parameters<typeof connectTls>[0]);
  expect(err.code).toBe('UNAUTHORIZED');
  expect(guest.refused).toBe(1);
  expect(guest.lastRefusal?.code).toBe('ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE');
});

test('a client certificate from another CA is refused', async () => {
  const err = await expectRefused({
    ...hostOpts(),
    cert: certs.otherCaClient.cert,
    key: certs.otherCaClient.key,
  });
  expect(err.code).toBe('UNAUTHORIZED');
  expect(guest.refused).toBe(1);
  expect(guest.lastRefusal?.code).toBe('UNABLE_TO_VERIFY_LEAF_SIGNATURE');
});

test('an expired client certificate from the right CA is refused', async () => {
  const err = await expectRefused({
    ...hostOpts(),
    cert: certs.expiredClient.cert,
    key: certs.expiredClient.key,
  });
  expect(err.code).toBe('UNAUTHORIZED');
  expect(guest.refused).toBe(1);
  expect(guest.lastRefusal?.code).toBe('CERT_HAS_EXPIRED');
});

test('the host refuses a guest whose certificate does not carry the expected name, or comes from another CA', async () => {
  const e1 = await expectRefused({ ...hostOpts(), servername: 'vm2.nestbroker.test' });
  expect(e1.code).toBe('UNAUTHORIZED');
  expect(e1.message).toMatch(/vm2\.nestbroker\.test|altname/i);
  const e2 = await expectRefused({ ...hostOpts(), ca: certs.otherCa });
  expect(e2.code).toBe('UNAUTHORIZED');
});

test('plaintext TCP gets no protocol service: a ping in clear is never answered', async () => {
  const raw = net.connect(port, '127.0.0.1');
  await new Promise((r) => raw.once('connect', r));
  let received = Buffer.alloc(0);
  raw.on('data', (d) => (received = Buffer.concat([received, d])));
  raw.on('error', () => undefined);
  raw.write('{"type":"ping","id":"p","t":1}\n');
  await new Promise((r) => raw.once('close', r));
  expect(received.toString('latin1')).not.toContain('pong');
  expect(opens).toBe(0);
  expect(guest.refused).toBe(1);
});

test('TLS 1.1 is refused (the floor is 1.2)', async () => {
  const sock = tls.connect({
    host: '127.0.0.1',
    port,
    cert: certs.client.cert,
    key: certs.client.key,
    ca: certs.ca,
    servername: 'localhost',
    minVersion: 'TLSv1',
    maxVersion: 'TLSv1.1',
  });
  const err = await new Promise<NodeJS.ErrnoException>((r) => sock.once('error', r));
  expect(err.code).toMatch(/ERR_SSL/);
  expect(opens).toBe(0);
});
