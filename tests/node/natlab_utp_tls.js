'use strict'
// utp-native (libutp) peers for the NAT lab, bound to any address (lab namespaces),
// optionally with Node TLS on top, as the original stack ran it.
//   node natlab_utp_tls.js echo HOST PORT                       echo server (half-close aware)
//   node natlab_utp_tls.js client HOST PORT NBYTES              send NBYTES random, read the echo,
//                                                               print sha256 of both directions
//   node natlab_utp_tls.js recv HOST PORT SECONDS [CERT KEY]    count bytes for SECONDS after the
//                                                               first one (TLS server if CERT KEY)
//   node natlab_utp_tls.js send HOST PORT SECONDS [tls]         stream zeros until SECONDS pass
// Every script prints one JSON object per line; servers print {"event":"listening"} first.
const crypto = require('crypto')
const fs = require('fs')
const tls = require('tls')
const utp = require('utp-native')

const [mode, host, portText, arg, certPath, keyPath] = process.argv.slice(2)
const port = Number(portText)

function report (obj) { process.stdout.write(JSON.stringify(obj) + '\n') }
function fail (err) { report({ event: 'error', message: String(err) }); process.exit(1) }

if (mode === 'echo') {
  const server = utp.createServer({ allowHalfOpen: true }, (conn) => {
    conn.on('error', (err) => report({ event: 'connection-error', message: String(err) }))
    conn.pipe(conn)
  })
  server.on('error', fail)
  server.listen(port, host, () => report({ event: 'listening', port: server.address().port }))
} else if (mode === 'client') {
  const total = Number(arg)
  const socket = utp({ allowHalfOpen: true })
  socket.on('error', fail)
  const sent = crypto.createHash('sha256')
  const received = crypto.createHash('sha256')
  let receivedBytes = 0
  const conn = socket.connect(port, host)
  conn.on('error', fail)
  conn.on('data', (data) => { receivedBytes += data.length; received.update(data) })
  conn.on('end', () => {
    report({ event: 'done', sent_sha256: sent.digest('hex'), received_bytes: receivedBytes,
      received_sha256: received.digest('hex') })
    process.exit(0)
  })
  let left = total
  const pump = () => {
    while (left > 0) {
      const chunk = crypto.randomBytes(Math.min(left, 65536))
      left -= chunk.length
      sent.update(chunk)
      if (!conn.write(chunk)) { conn.once('drain', pump); return }
    }
    conn.end()
  }
  pump()
} else if (mode === 'recv') {
  const seconds = Number(arg)
  const secure = certPath && keyPath
  const options = secure ? { key: fs.readFileSync(keyPath), cert: fs.readFileSync(certPath) } : null
  const server = utp.createServer((raw) => {
    raw.on('error', () => {})
    const conn = secure ? new tls.TLSSocket(raw, { isServer: true, ...options }) : raw
    let bytes = 0
    let started = null
    conn.on('error', () => {})
    conn.on('data', (data) => {
      if (started === null) {
        started = process.hrtime.bigint()
        setTimeout(() => {
          const elapsed = Number(process.hrtime.bigint() - started) / 1e9
          report({ event: 'received', bytes, seconds: elapsed })
          process.exit(0)
        }, seconds * 1000)
      }
      bytes += data.length
    })
  })
  server.on('error', fail)
  server.listen(port, host, () => report({ event: 'listening', port: server.address().port }))
} else if (mode === 'send') {
  const seconds = Number(arg)
  const socket = utp()
  socket.on('error', () => process.exit(0))
  const raw = socket.connect(port, host)
  raw.on('error', () => process.exit(0))
  const conn = certPath === 'tls' ? tls.connect({ socket: raw, rejectUnauthorized: false }) : raw
  conn.on('error', () => process.exit(0))
  const chunk = Buffer.alloc(65536)
  const pump = () => { while (conn.write(chunk)) {} conn.once('drain', pump) }
  pump()
  setTimeout(() => process.exit(0), seconds * 1000)
} else {
  fail('unknown mode ' + mode)
}
