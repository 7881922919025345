'use strict'
// A libutp client: `node utp_client.js host port nbytes [sockbuf]`.
// Sends nbytes of random data, half-closes, reads everything the server sends
// back until its FIN, then prints sha256 of both directions and exits.
const crypto = require('crypto')
const { utp, report, fail, sizeBuffers, writeAll } = require('./utp_common')

const host = process.argv[2]
const port = Number(process.argv[3])
const total = Number(process.argv[4])
const sockbuf = Number(process.argv[5] || 0)
if (!host || !port || !(total >= 0)) fail('usage: utp_client.js host port nbytes [sockbuf]')

const socket = utp({ allowHalfOpen: true })
socket.on('error', fail)
socket.bind(0, '127.0.0.1', () => sizeBuffers(socket, sockbuf))
const sentHash = crypto.createHash('sha256')
const receivedHash = crypto.createHash('sha256')
let received = 0
const started = process.hrtime.bigint()

const conn = socket.connect(port, host)
conn.on('error', fail)
conn.on('data', (data) => {
  received += data.length
  receivedHash.update(data)
})
conn.on('end', () => {
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  report({
    event: 'done',
    sent_bytes: total,
    sent_sha256: sentHash.digest('hex'),
    received_bytes: received,
    received_sha256: receivedHash.digest('hex'),
    seconds
  })
  process.exit(0)
})
writeAll(conn, total, (size) => {
  const chunk = crypto.randomBytes(size)
  sentHash.update(chunk)
  return chunk
})
