"""The fake teacher's own process: what `FakeTeacherServer(process=True)` launches.

python -m imitate.teacher.fake --port 8089 --rpm 600 --tpm 200000 --faults 500=0.02,reset=0.01
"""

from imitate.teacher.fake.runner import main

main()
