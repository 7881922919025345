'use strict'
// A libutp echo server: `node utp_echo_server.js [host] [port] [sockbuf]`.
// Prints {"event":"listening","port":N} once bound; echoes every connection and
// half-closes after the client does. Runs until killed (utp-native's server close
// hangs, see mafintosh/utp-native#40, so the harness kills it).
const { utp, report, fail, sizeBuffers } = require('./utp_common')

const host = process.argv[2] || '127.0.0.1'
const port = Number(process.argv[3] || 0)
const sockbuf = Number(process.argv[4] || 0)

const server = utp.createServer({ allowHalfOpen: true }, (conn) => {
  conn.on('error', (err) => report({ event: 'connection-error', message: String(err) }))
  conn.pipe(conn)
})
server.on('error', fail)
server.listen(port, host, () => {
  sizeBuffers(server, sockbuf)
  report({ event: 'listening', host, port: server.address().port })
})
