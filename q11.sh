source /tmp/s17/run.sh
cd /tmp/s18
OMP_NUM_THREADS=1 PYTHONPATH=/tmp/s18/snapH/src python /tmp/s18/snapH/bench/isac2_bench.py --quick --n 300 --workers 2 --out /tmp/s18/warmH > /dev/null 2>&1
run H_50k_s1 /tmp/s18/snapH 50000 1 /tmp/s15/n50k/data
touch q11.done
