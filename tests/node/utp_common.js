'use strict'
// Shared helpers for the utp-native (libutp) peers used by tests and bench/utp_bulk.py.
// Every script reports on stdout, one JSON object per line.

const utp = require('utp-native')

function report (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function fail (message) {
  report({ event: 'error', message: String(message) })
  process.exit(1)
}

// Optional larger UDP socket buffers (bytes); 0 keeps the system default, which is
// what the original system ran with.
function sizeBuffers (socket, bytes) {
  if (!bytes) return
  socket.setRecvBufferSize(bytes)
  socket.setSendBufferSize(bytes)
}

// Write `total` bytes produced by `chunkOf(size)` with backpressure, then end().
function writeAll (conn, total, chunkOf, done) {
  let left = total
  function pump () {
    while (left > 0) {
      const size = Math.min(left, 65536)
      left -= size
      if (!conn.write(chunkOf(size))) {
        conn.once('drain', pump)
        return
      }
    }
    conn.end()
    if (done) done()
  }
  pump()
}

module.exports = { utp, report, fail, sizeBuffers, writeAll }
