import random
K_T,K_C,K_S,K_D=256,64,64,256
def strip(x,rows,cols,V):
    kLanes=K_C//V; kRPP=K_T//kLanes; kP=K_S//kRPP
    lr=lambda t,p:p*kRPP+t//kLanes; lc=lambda t:(t%kLanes)*V
    trc=lambda t:((t>>5)&1)*32+(t&31); trr=lambda t:(t>>6)*16
    gx=max(1,-(-cols//K_C)); gy=-(-rows//K_D) if rows>K_D else 1
    y=[-1]*(rows*cols); yt=[-1]*(rows*cols); part=[[None]*cols for _ in range(gy)]
    for by in range(gy):
      for bx in range(gx):
        c0=bx*K_C; rb=by*K_D
        sums=[[0]*V for _ in range(K_T)]
        for sub in range(K_D//K_S):
            r0=rb+sub*K_S
            if r0>=rows: break
            tile=[[-9]*K_C for _ in range(K_S)]
            for t in range(K_T):
                for p in range(kP):
                    tr=lr(t,p); r=r0+tr; c=c0+lc(t)
                    if c<cols and r<rows:
                        for k in range(V):
                            v=x[r*cols+c+k]; y[r*cols+c+k]=v; tile[tr][lc(t)+k]=v; sums[t][k]+=v
            for t in range(K_T):
                tc=trc(t); tr=trr(t); cc=c0+tc; r=r0+tr
                if cc<cols and r<rows:
                    for k in range(16):
                        v=tile[tr+k][tc]; assert v>=0
                        assert yt[cc*rows+r+k]==-1
                        yt[cc*rows+r+k]=v
        cs=[[0]*K_C for _ in range(kRPP)]
        for t in range(K_T):
            for k in range(V): cs[lr(t,0)][lc(t)+k]=sums[t][k]
        for t in range(K_C):
            if c0+t<cols: part[by][c0+t]=sum(cs[i][t] for i in range(kRPP))
    assert y==x
    assert yt==[x[r*cols+c] for c in range(cols) for r in range(rows)]
    for i in range(gy):
        for c in range(cols):
            assert part[i][c]==sum(x[r*cols+c] for r in range(i*K_D,min(rows,(i+1)*K_D)))
for rows,cols,V in [(48,96,8),(304,80,4),(528,48,8),(48,100,4),(16,8,8),(272,72,8),(32,16,8),(784,136,4)]:
    x=[random.randint(0,1000) for _ in range(rows*cols)]
    strip(x,rows,cols,V); print("ok",rows,cols,V)
