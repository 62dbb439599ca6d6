# Bounded QoS 1 flood: one publisher sends N QoS 1 publishes (pipelined,
# at most WINDOW unacknowledged), one subscriber reads as fast as it can
# and PUBACKs each; prints PUBACKed count and delivered count.
import socket, struct, sys, time, threading, select
port=int(sys.argv[1]); N=int(sys.argv[2]); WINDOW=int(sys.argv[3]) if len(sys.argv)>3 else 65535
def s(b): return struct.pack(">H", len(b)) + b
def rl(n):
    out=b""
    while True:
        d=n%128; n//=128
        if n: d|=0x80
        out+=bytes([d])
        if not n: return out
def connect(cid):
    body=s(b"MQTT")+bytes([4,2])+struct.pack(">H",60)+s(cid)
    c=socket.create_connection(("127.0.0.1",port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
    c.sendall(bytes([0x10])+rl(len(body))+body); assert c.recv(4)[0]==0x20; return c
sub=connect(b"flood-sub")
body=struct.pack(">H",1)+s(b"flood/t")+b"\x01"
sub.sendall(bytes([0x82])+rl(len(body))+body); sub.recv(5)
pub=connect(b"flood-pub")
payload=b"x"*64
delivered=0; done=threading.Event()
def reader():
    global delivered
    buf=b""; sub.settimeout(0.5); idle=0
    while True:
        try: d=sub.recv(1<<20)
        except socket.timeout:
            if done.is_set(): idle+=1
            if idle>=4: return
            continue
        if not d: return
        buf+=d; acks=[]
        while len(buf)>=2:
            # parse remaining length
            mul=1; n=0; i=1
            while True:
                if i>=len(buf): break
                b=buf[i]; n+=(b&0x7f)*mul; mul*=128; i+=1
                if not b&0x80: break
            else: pass
            if i>len(buf) or (buf[i-1]&0x80) or len(buf)<i+n: break
            pkt=buf[:i+n]; buf=buf[i+n:]
            if pkt[0]>>4==3:
                delivered+=1
                tl=struct.unpack(">H",pkt[i:i+2])[0]
                if (pkt[0]>>1)&3: acks.append(b"\x40\x02"+pkt[i+2+tl:i+4+tl])
        if acks: sub.sendall(b"".join(acks))
t=threading.Thread(target=reader); t.start()
t0=time.time(); acked=0; sent=0; rbuf=b""
while acked<N and time.time()-t0<60:
    batch=[]
    while sent<N and sent-acked<WINDOW and len(batch)<500:
        pid=sent%65535+1; vh=s(b"flood/t")+struct.pack(">H",pid)+payload
        batch.append(bytes([0x32])+rl(len(vh))+vh); sent+=1
    if batch: pub.sendall(b"".join(batch))
    r,_,_=select.select([pub],[],[],0 if sent<N and sent-acked<WINDOW else 1)
    if r:
        d=pub.recv(1<<20); rbuf+=d
        k=len(rbuf)//4; acked+=k; rbuf=rbuf[k*4:]
pub_s=time.time()-t0
done.set(); t.join(timeout=30)
print(f"published {sent}, PUBACKed {acked} in {pub_s:.2f}s, delivered {delivered}")
