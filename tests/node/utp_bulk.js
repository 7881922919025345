'use strict'
// libutp bulk-transfer and latency peer for bench/utp_bulk.py.
//   node utp_bulk.js receive [sockbuf]            listen, count one connection's bytes to EOF
//   node utp_bulk.js send host port nbytes [sockbuf]   connect and send nbytes, wait for close
//   node utp_bulk.js local nbytes [sockbuf]       sender and receiver in this one process
//   node utp_bulk.js rtt count                    1-byte echo round trips in this process
// Receivers time from the connection to its FIN and print {"event":"received",...}.
const { utp, report, fail, sizeBuffers, writeAll } = require('./utp_common')

const mode = process.argv[2]
const payload = Buffer.alloc(65536, 0x5a)
const chunkOf = (size) => (size === payload.length ? payload : payload.subarray(0, size))

function receiver (sockbuf, onListening, onReceived) {
  const server = utp.createServer({ allowHalfOpen: true }, (conn) => {
    const started = process.hrtime.bigint()
    let bytes = 0
    conn.on('error', fail)
    conn.on('data', (data) => { bytes += data.length })
    conn.on('end', () => {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9
      conn.end()
      onReceived({ event: 'received', bytes, seconds })
    })
  })
  server.on('error', fail)
  server.listen(0, '127.0.0.1', () => {
    sizeBuffers(server, sockbuf)
    onListening(server.address().port)
  })
}

function sender (host, port, total, sockbuf, onDone) {
  const socket = utp({ allowHalfOpen: true })
  socket.on('error', fail)
  socket.bind(0, '127.0.0.1', () => sizeBuffers(socket, sockbuf))
  const conn = socket.connect(port, host)
  conn.on('error', fail)
  conn.on('data', () => {})
  conn.on('end', () => onDone())
  writeAll(conn, total, chunkOf)
}

if (mode === 'receive') {
  receiver(Number(process.argv[3] || 0),
    (port) => report({ event: 'listening', port }),
    (result) => { report(result); setTimeout(() => process.exit(0), 50) })
} else if (mode === 'send') {
  const [host, port, total, sockbuf] = process.argv.slice(3)
  sender(host, Number(port), Number(total), Number(sockbuf || 0), () => {
    report({ event: 'sent' })
    process.exit(0)
  })
} else if (mode === 'local') {
  const total = Number(process.argv[3])
  const sockbuf = Number(process.argv[4] || 0)
  receiver(sockbuf, (port) => {
    sender('127.0.0.1', port, total, sockbuf, () => {})
  }, (result) => { report(result); process.exit(0) })
} else if (mode === 'rtt') {
  const count = Number(process.argv[3] || 1000)
  const server = utp.createServer({ allowHalfOpen: true }, (conn) => conn.pipe(conn))
  server.listen(0, '127.0.0.1', () => {
    const conn = utp.connect(server.address().port, '127.0.0.1')
    conn.on('error', fail)
    const samples = []
    let started = 0n
    const one = Buffer.from('x')
    conn.on('data', () => {
      samples.push(Number(process.hrtime.bigint() - started) / 1e3)
      if (samples.length >= count) {
        report({ event: 'rtt', microseconds: samples })
        process.exit(0)
      }
      started = process.hrtime.bigint()
      conn.write(one)
    })
    started = process.hrtime.bigint()
    conn.write(one)
  })
} else {
  fail('unknown mode ' + mode)
}
