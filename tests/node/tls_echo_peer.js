'use strict'
// A Node TLS 1.3 echo peer for the TLSStream interoperability tests.
//
//   node tls_echo_peer.js server <key.pem> <chain.pem> <tcp|utp> [host]
//   node tls_echo_peer.js client <key.pem> <chain.pem> <tcp|utp> <host> <port>
//   (key and chain "-": no certificate at all)
//
// Both roles present our certificates (PEM chain, leaf first), require and accept
// any peer chain (rejectUnauthorized: false; the Python side verifies), echo every
// byte back with backpressure, and end (close_notify) once the peer has ended.
// The server handles one connection, then exits. Reports on stdout, one JSON
// object per line: listening, secure (peer chain as base64 DER, leaf first),
// done (bytes and sha256 of what was received), error.
const tls = require('tls')
const fs = require('fs')
const crypto = require('crypto')

const [role, keyPath, chainPath, transport, hostArg, portArg] = process.argv.slice(2)
const host = hostArg || '127.0.0.1'

function report (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function fail (err) {
  report({ event: 'error', message: String(err && err.stack ? err.stack : err) })
  process.exit(1)
}

// A key path of "-" means: present no certificate (to test that it is refused).
const identity = keyPath === '-' ? {} : { key: fs.readFileSync(keyPath), cert: fs.readFileSync(chainPath) }
const options = {
  ...identity,
  minVersion: 'TLSv1.3',
  maxVersion: 'TLSv1.3',
  requestCert: true,
  rejectUnauthorized: false,
  allowHalfOpen: true
}

// The peer's chain as sent, leaf first, following Node's issuer links.
function peerChain (socket) {
  const chain = []
  const seen = new Set()
  let cert = socket.getPeerCertificate(true)
  while (cert && cert.raw && !seen.has(cert.fingerprint256)) {
    seen.add(cert.fingerprint256)
    chain.push(cert.raw.toString('base64'))
    cert = cert.issuerCertificate
  }
  return chain
}

function echo (socket) {
  const hash = crypto.createHash('sha256')
  let received = 0
  report({
    event: 'secure',
    protocol: socket.getProtocol(),
    cipher: socket.getCipher().name,
    chain: peerChain(socket)
  })
  socket.on('data', (data) => {
    hash.update(data)
    received += data.length
    if (!socket.write(data)) {
      socket.pause()
      socket.once('drain', () => socket.resume())
    }
  })
  socket.on('end', () => {
    // The peer's close_notify: answer with ours once every echo byte is out.
    socket.end(() => {
      report({ event: 'done', bytes: received, sha256: hash.digest('hex') })
    })
  })
  socket.on('close', () => process.exit(0))
}

function wrapServer (rawSocket) {
  const socket = new tls.TLSSocket(rawSocket, { ...options, isServer: true })
  socket.on('error', fail)
  socket.on('secure', () => echo(socket))
}

if (role === 'server' && transport === 'tcp') {
  const server = tls.createServer(options, (socket) => {
    server.close()
    echo(socket)
  })
  server.on('tlsClientError', fail)
  server.on('error', fail)
  server.listen(0, host, () => report({ event: 'listening', port: server.address().port }))
} else if (role === 'server' && transport === 'utp') {
  const utp = require('utp-native')
  const server = utp.createServer({ allowHalfOpen: true }, (conn) => wrapServer(conn))
  server.on('error', fail)
  server.listen(0, host, () => report({ event: 'listening', port: server.address().port }))
} else if (role === 'client') {
  const port = Number(portArg)
  const connectOptions = { ...options }
  if (transport === 'utp') {
    const utp = require('utp-native')
    connectOptions.socket = utp.connect(port, host, { allowHalfOpen: true })
  } else {
    connectOptions.host = host
    connectOptions.port = port
  }
  const socket = tls.connect(connectOptions, () => echo(socket))
  socket.on('error', fail)
} else {
  fail(`usage: tls_echo_peer.js server|client key chain tcp|utp [host] [port] (got ${process.argv.slice(2)})`)
}
