'use strict';
// The Socket.IO 4 peer: the same room work as the ws peer, as Socket.IO events with acks.
// WebSocket transport only (no polling upgrade), JSON packets (Socket.IO's default parser).
// A room broadcast is io.to(room).emit(...): Socket.IO encodes the packet once per broadcast.
const { Server } = require('socket.io');
const { args, verify, Rooms } = require('../common');

const opts = args(process.argv);
const rooms = new Rooms();
const sockets = new Map(); // user -> Set(socket)

const io = new Server({ transports: ['websocket'], perMessageDeflate: false, serveClient: false, maxHttpBufferSize: 262144 });

io.use((socket, next) => {
  const user = verify(socket.handshake.auth && socket.handshake.auth.token, opts.secret);
  if (!user) return next(new Error('unauthorized'));
  socket.data.user = user;
  next();
});

function enter(id, users) {
  for (const user of users) {
    const set = sockets.get(user);
    if (set) for (const s of set) s.join('r' + id);
  }
}

io.on('connection', (socket) => {
  const user = socket.data.user;
  if (!sockets.has(user)) sockets.set(user, new Set());
  sockets.get(user).add(socket);
  for (const id of rooms.of(user)) socket.join('r' + id); // a reconnecting client is back in its rooms
  socket.on('disconnect', () => {
    const set = sockets.get(user);
    if (set) { set.delete(socket); if (!set.size) sockets.delete(user); }
  });
  socket.on('create_group', (cmd, ack) => {
    const members = [user, ...((cmd && cmd.members) || [])];
    const id = rooms.create(members);
    enter(id, members);
    ack({ room: { room_id: id, kind: 'group', title: cmd.title, member_count: members.length, last_seq: 0 } });
  });
  socket.on('create_dm', (cmd, ack) => {
    const id = rooms.dm(user, cmd.user_id);
    enter(id, [user, cmd.user_id]);
    ack({ room: { room_id: id, kind: 'dm', title: '', member_count: 2, last_seq: 0, peer: cmd.user_id } });
  });
  socket.on('send', (cmd, ack) => {
    const done = rooms.append(cmd.room_id, user, cmd.body);
    if (!done) { if (ack) ack({ error: 'not_found' }); return; }
    io.to('r' + cmd.room_id).emit('event', done.event);
    if (ack) ack({ seq: done.event.seq, at: done.event.at, duplicate: false });
  });
  socket.on('typing', (cmd, ack) => {
    socket.to('r' + cmd.room_id).emit('typing', { type: 'typing', room_id: cmd.room_id, user_id: user, active: !!cmd.active });
    if (ack) ack({});
  });
  socket.on('subscribe_presence', (cmd, ack) => {
    const ids = (cmd && cmd.user_ids) || [];
    for (const u of ids) socket.join('p:' + u);
    if (ack) ack({ presence: ids.map((u) => ({ user_id: u, status: sockets.has(u) ? 'online' : 'offline' })) });
  });
  socket.on('set_presence', (cmd, ack) => {
    const status = cmd.status === 'invisible' ? 'offline' : cmd.status;
    io.to('p:' + user).emit('presence', { type: 'presence', users: [{ user_id: user, status }] });
    if (ack) ack({});
  });
  socket.on('ping', (cmd, ack) => { if (ack) ack({ now: Date.now() / 1000 }); });
  socket.on('sync', (cmd, ack) => {
    const out = [];
    for (const [key, seq] of Object.entries((cmd && cmd.rooms) || {})) {
      const room = rooms.rooms.get(Number(key));
      if (!room || !room.members.has(user)) continue;
      const events = room.log.filter((e) => e.seq > seq);
      if (events.length) out.push({ room_id: Number(key), events, has_more: false, too_far_behind: false });
    }
    if (ack) ack({ rooms: out, removed: [], added: [] });
  });
});

io.listen(opts.port, { host: '127.0.0.1' });
console.log(JSON.stringify({ event: 'ready', port: opts.port }));
process.on('SIGTERM', () => process.exit(0));
