import torch, torchvision, convfx, time, logging
from passes.latency import time_models
torch.set_num_threads(2)
logging.basicConfig(level=logging.INFO, format="%(message)s")
logging.getLogger("convfx").setLevel(logging.INFO)
m = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
x = torch.randn(1,3,224,224).contiguous(memory_format=torch.channels_last)
t0=time.time()
lat = convfx.compress(m, x, latency_target=0.5, latency_backend="inductor", rank_multiple=16, progress=False)
print("compress s", time.time()-t0, lat.convfx_report.latency.get("measured_speedup"), lat.convfx_report.latency.get("rounds"))
for i in range(3):
    torch._dynamo.reset()
    t = time_models({"original": m, "lat": lat}, (x,), "inductor", warmup=3, rounds=15, device=torch.device("cpu"))
    print(i, "orig %.2f lat %.2f speedup %.2f" % (t["original"].median*1e3, t["lat"].median*1e3, t["original"].median/t["lat"].median))
t = time_models({"original": m, "lat": lat}, (x,), "inductor", warmup=3, rounds=15, device=torch.device("cpu"))
print("no reset", "orig %.2f lat %.2f speedup %.2f" % (t["original"].median*1e3, t["lat"].median*1e3, t["original"].median/t["lat"].median))
