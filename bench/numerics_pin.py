"""Does the fp32 switch's pin take effect? Three SGD steps of a ResNet-18 on fixed inputs, one
thread; prints the ATen capability, the last loss and a hash of the weights. Run it with and without
the switch's variables:

    .venv/bin/python bench/numerics_pin.py
    env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 .venv/bin/python bench/numerics_pin.py

On an AVX-512 CPU the two lines differ when the pin changes the kernels; on two machines under the
pin they should match (README, `make demo FP32=1`)."""

import hashlib

import torch
import torchvision

torch.set_num_threads(1)
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
images = torch.randn(8, 3, 64, 64)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    loss = model(images).logsumexp(1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
digest = hashlib.sha256(
    b"".join(p.detach().numpy().tobytes() for p in model.parameters())
).hexdigest()[:12]
print(torch.backends.cpu.get_cpu_capability(), f"loss {loss.item():.10f}", f"weights {digest}")
