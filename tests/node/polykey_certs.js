// The original's certificate code (polykey 1.15.1) as a test peer.
// Reads one JSON array of requests on stdin, writes one JSON array of answers.
// Binary values travel as hex. Used by tests/proxy/test_polykey_interop.py.
'use strict';

const keysUtils = require('polykey/dist/keys/utils');
const nodesUtils = require('polykey/dist/nodes/utils');
const ids = require('polykey/dist/ids');
const { IdInternal } = require('@matrixai/id');

const fromHex = (text) => Buffer.from(text, 'hex');
const toHex = (bytes) => Buffer.from(bytes).toString('hex');

function decodeNodeIdOrThrow(text) {
  const nodeId = ids.decodeNodeId(text);
  if (nodeId == null) throw new Error(`not a NodeId: ${text}`);
  return nodeId;
}

function describeKeyPair(keyPair) {
  const nodeId = keysUtils.publicKeyToNodeId(keyPair.publicKey);
  return { public_key: toHex(keyPair.publicKey), node_id: ids.encodeNodeId(nodeId) };
}

// A chain the way the original's CertManager builds one: a self-signed root, then
// each rotation's certificate issued and signed by the previous key. Leaf first.
async function generateChain({ length, duration, now }) {
  const certIdGenerator = keysUtils.createCertIdGenerator();
  const date = now == null ? new Date() : new Date(now * 1000);
  let issuerKeyPair = null;
  const chain = [];
  const keys = [];
  for (let index = 0; index < length; index++) {
    const keyPair = keysUtils.generateKeyPair();
    const cert = await keysUtils.generateCertificate({
      certId: certIdGenerator(),
      subjectKeyPair: keyPair,
      issuerPrivateKey: (issuerKeyPair ?? keyPair).privateKey,
      duration,
      now: date,
    });
    chain.unshift(toHex(keysUtils.certToASN1(cert)));
    keys.unshift(describeKeyPair(keyPair));
    issuerKeyPair = keyPair;
  }
  return { chain, keys };
}

// One certificate from given keys, serial and time: to compare bytes with ours.
async function generateCertificate({ subject_private, issuer_private, serial, now, duration }) {
  const subjectPrivateKey = fromHex(subject_private);
  const subjectKeyPair = {
    privateKey: subjectPrivateKey,
    publicKey: keysUtils.publicKeyFromPrivateKeyEd25519(subjectPrivateKey),
  };
  const cert = await keysUtils.generateCertificate({
    certId: IdInternal.fromBuffer(fromHex(serial)),
    subjectKeyPair,
    issuerPrivateKey: fromHex(issuer_private),
    duration,
    now: new Date(now * 1000),
  });
  return { cert: toHex(keysUtils.certToASN1(cert)) };
}

async function inspect({ cert }) {
  const parsed = keysUtils.certFromASN1(fromHex(cert));
  if (parsed == null) return { parsed: false };
  const nodeId = keysUtils.certNodeId(parsed);
  const publicKey = keysUtils.certPublicKey(parsed);
  return {
    parsed: true,
    node_id: nodeId == null ? null : ids.encodeNodeId(nodeId),
    public_key: publicKey == null ? null : toHex(publicKey),
    node_signed: await keysUtils.certNodeSigned(parsed),
    self_signed: publicKey == null ? false : await keysUtils.certSignedBy(parsed, publicKey),
    serial: parsed.serialNumber,
    version_extension: parsed.getExtension('1.3.6.1.4.1.57167.2.2.1')?.version ?? null,
  };
}

async function link({ child, parent }) {
  const childCert = keysUtils.certFromASN1(fromHex(child));
  const parentCert = keysUtils.certFromASN1(fromHex(parent));
  return {
    issued_by: keysUtils.certIssuedBy(childCert, parentCert),
    signed_by: await keysUtils.certSignedBy(childCert, keysUtils.certPublicKey(parentCert)),
  };
}

async function verifyServer({ node_ids, chain }) {
  const result = await nodesUtils.verifyServerCertificateChain(
    node_ids.map(decodeNodeIdOrThrow),
    chain.map(fromHex),
  );
  if (result.result === 'success') return { ok: true, node_id: ids.encodeNodeId(result.nodeId) };
  return { ok: false, error: String(result.value) };
}

async function verifyClient({ chain }) {
  const error = await nodesUtils.verifyClientCertificateChain(chain.map(fromHex));
  return error === undefined ? { ok: true } : { ok: false, error: String(error) };
}

const operations = {
  generate_chain: generateChain,
  generate_certificate: generateCertificate,
  inspect,
  link,
  verify_server: verifyServer,
  verify_client: verifyClient,
  encode_node_id: async ({ raw }) => ({ text: ids.encodeNodeId(IdInternal.fromBuffer(fromHex(raw))) }),
  decode_node_id: async ({ text }) => {
    const nodeId = ids.decodeNodeId(text);
    return { raw: nodeId == null ? null : toHex(nodeId) };
  },
};

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const requests = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const answers = [];
  for (const request of requests) {
    const operation = operations[request.op];
    if (operation == null) throw new Error(`unknown op ${request.op}`);
    answers.push(await operation(request));
  }
  process.stdout.write(JSON.stringify(answers));
}

main().catch((error) => {
  process.stderr.write(`${error.stack ?? error}\n`);
  process.exit(1);
});
